//! End-to-end tests through a real Docker engine (issue 3): the real `docker` CLI drives a real
//! dockerd, which talks to the real plugin binary over its socket.
//!
//! # Isolation
//!
//! The suite starts ONE private dockerd for all scenarios and never touches a Docker engine or a
//! docker-on-top already on the machine:
//!
//! - an anchor process (`unshare --mount --propagation private sleep infinity`) owns a private
//!   mount namespace; a private tmpfs is mounted on `/run/docker/plugins` inside it, so dockerd
//!   discovers only our plugin socket there;
//! - dockerd and the plugin run in that namespace (`nsenter -t ANCHOR -m`), so the plugin's
//!   overlay mounts and dockerd's own mounts never reach the host, and they vanish with the
//!   namespace;
//! - dockerd has its own `--data-root`, `--exec-root`, `-H` socket, `--pidfile`,
//!   `--config-file` and `--cgroup-parent`, with `--iptables=false --ip6tables=false
//!   --bridge=none` (containers run with `--network none`); the plugin has its own `--root`;
//!   everything lives under one temporary directory.
//!
//! Teardown (at the end, after a panic, and on SIGINT/SIGTERM/SIGHUP) removes the containers,
//! stops dockerd and the plugin, kills whatever is left in the namespace and in our cgroup,
//! kills the anchor (its mounts vanish), and removes the temporary directory. Every process we
//! start also gets `PR_SET_PDEATHSIG`.
//!
//! # Running
//!
//! As root: `cargo test --test docker`. Positional arguments select scenarios whose name
//! contains one of them (`cargo test --test docker -- volatile bench`). The plugin's and
//! dockerd's logs are copied to `target/tmp/docker-e2e/` at the end. With
//! `DOT_WRITE_BENCHMARKS=1`, the measured medians are written to `BENCHMARKS.md`.
//!
//! The `docker run` benchmark alone: `cargo test --test docker -- benchmark` (no scenario
//! name contains "benchmark"); `DOT_BENCH_RUNS=N` measures N runs per kind instead of 15.
//!
//! A scenario that cannot run (no root, dockerd does not start, ...) is a failure, never a skip.
//!
//! Scenarios 13 and 14 `kill -9` the suite's dockerd and start it again with the same flags
//! (14 with `--live-restore`, then once more without), so they run after the others.

#[path = "common/host.rs"]
mod host;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use rustix::process::Signal;
use serde_json::Value;

use host::{
    Context, DOCKER_PROGRAMS, Output, PLUGIN_SOCKET, Res, anchor_command, busybox_rootfs,
    check_interrupted, create_missing_dirs, docker_command, ensure, find_busybox, kill,
    kill_cgroup, kill_ns, make_tree, ns_of, nsenter, own_ns, pids_in_ns, plugin_env,
    private_dockerd_args, remove_cgroups, remove_dirs, require_programs, run_cmd, set_interrupted,
    spawn_logged, stdout_suffix, tail, tar_dir, wait_until_every,
};

const IMAGE: &str = "dot-e2e:latest";
const DRIVER: &str = "docker-on-top";
const PLUGIN_BIN: &str = env!("CARGO_BIN_EXE_docker-on-top");
const CMD_TIMEOUT: Duration = Duration::from_secs(90);
/// A container command that runs until `docker stop` and then exits at once.
const LONG_RUNNING: &str = "trap 'exit 0' TERM INT; while :; do sleep 1 & wait $!; done";
/// Measured `docker run`s per kind (after one warm-up); `DOT_BENCH_RUNS` overrides it.
const BENCH_RUNS: usize = 15;
const BENCH_HEADING: &str = "## docker run with a volume (issue 3)";

/// How often the suite polls.
const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` every [`POLL`] until it holds or `timeout` passes.
fn wait_until(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    wait_until_every(POLL, timeout, cond)
}

// ----- Files ------------------------------------------------------------------------------------

/// What a directory tree holds: relative path → description (kind, mode, owner, content).
fn snapshot(dir: &Path) -> Res<BTreeMap<String, String>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> Res {
        for entry in fs::read_dir(dir).ctx(format!("reading {}", dir.display()))? {
            let entry = entry.ctx("reading a directory entry")?;
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).ctx(format!("stat {}", path.display()))?;
            let owner = format!("{:o} {}:{}", meta.mode() & 0o7777, meta.uid(), meta.gid());
            let ft = meta.file_type();
            let desc = if ft.is_dir() {
                walk(root, &path, out)?;
                format!("dir {owner}")
            } else if ft.is_file() {
                let content = fs::read(&path).ctx(format!("reading {}", path.display()))?;
                format!("file {owner} {:?}", String::from_utf8_lossy(&content))
            } else if ft.is_symlink() {
                format!("symlink {:?}", fs::read_link(&path).unwrap_or_default())
            } else if ft.is_char_device() {
                format!("chardev {}", meta.rdev())
            } else {
                format!("other {owner}")
            };
            out.insert(rel, desc);
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

fn read(path: &Path) -> Res<String> {
    fs::read_to_string(path).ctx(format!("reading {}", path.display()))
}

fn write(path: &Path, content: &str) -> Res {
    check_interrupted()?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).ctx(format!("creating {}", parent.display()))?;
    }
    fs::write(path, content).ctx(format!("writing {}", path.display()))
}

fn entries(dir: &Path) -> Res<BTreeSet<String>> {
    fs::read_dir(dir)
        .ctx(format!("reading {}", dir.display()))?
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .ctx("reading a directory entry")
        })
        .collect()
}

fn is_whiteout(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

/// Decodes the octal escapes (`\040` etc.) of a /proc/*/mountinfo path field.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let digit = |k: usize| u32::from(bytes[i + k] - b'0');
            out.push((digit(1) * 64 + digit(2) * 8 + digit(3)) as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ----- Teardown state shared with the signal handler -------------------------------------------

/// Everything that must go when the suite ends, however it ends.
#[derive(Default)]
struct Resources {
    tmp: Option<PathBuf>,
    /// The anchor's mount namespace (`mnt:[N]`); never our own.
    ns: Option<String>,
    anchor_pid: Option<u32>,
    cgroup_parent: Option<String>,
    /// Directories we created on the host (as mount points), innermost last.
    made_dirs: Vec<PathBuf>,
    destroyed: bool,
}

impl Resources {
    /// Kills everything left and removes what we made. Idempotent; returns warnings.
    fn destroy(&mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.destroyed {
            return warnings;
        }
        self.destroyed = true;
        // Containers (they live in child namespaces, but in our cgroup).
        if let Some(parent) = &self.cgroup_parent {
            kill_cgroup(parent, 50, POLL);
        }
        // dockerd, containerd, shims, the plugin, the anchor: all in the namespace.
        if let Some(ns) = &self.ns
            && *ns != own_ns()
        {
            warnings.extend(kill_ns(ns, POLL));
        }
        if let Some(pid) = self.anchor_pid {
            kill(pid, Signal::KILL);
        }
        if let Some(parent) = &self.cgroup_parent {
            warnings.extend(remove_cgroups(parent, Duration::from_secs(2), POLL));
        }
        warnings.extend(remove_dirs(&self.made_dirs));
        if let Some(tmp) = &self.tmp {
            // The namespace is gone with its mounts: this only deletes plain files. Retried,
            // as after a signal the main thread may still be writing here for a moment.
            let mut result = Ok(());
            for _ in 0..20 {
                result = fs::remove_dir_all(tmp);
                if result.is_ok() || !tmp.exists() {
                    result = Ok(());
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            if let Err(e) = result {
                warnings.push(format!("cannot remove {}: {e}", tmp.display()));
            }
        }
        warnings
    }
}

/// On SIGINT, SIGTERM or SIGHUP: tear down by force and exit.
fn install_signal_teardown(resources: Arc<Mutex<Resources>>) {
    thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        });
        set_interrupted();
        eprintln!("docker e2e: interrupted; tearing down");
        let warnings = resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .destroy();
        for w in warnings {
            eprintln!("docker e2e: teardown: {w}");
        }
        std::process::exit(130);
    });
}

// ----- The suite --------------------------------------------------------------------------------

struct Suite {
    tmp: PathBuf,
    /// The plugin's `--root`.
    root: PathBuf,
    bases: PathBuf,
    docker_sock: PathBuf,
    docker_config: PathBuf,
    dockerd_log: PathBuf,
    plugin_log: PathBuf,
    cgroup_parent: String,
    resources: Arc<Mutex<Resources>>,
    anchor: Option<Child>,
    anchor_pid: u32,
    dockerd: Option<Child>,
    plugin: Option<Child>,
    busybox: PathBuf,
    seq: u32,
}

impl Suite {
    fn new(resources: Arc<Mutex<Resources>>) -> Res<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("dot-e2e-")
            .tempdir()
            .ctx("creating the temporary directory")?
            .keep();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).ctx("chmod tmp")?;
        let cgroup_parent = format!("dot-e2e-{}", std::process::id());
        {
            let mut r = resources.lock().unwrap();
            r.tmp = Some(tmp.clone());
            r.cgroup_parent = Some(cgroup_parent.clone());
        }
        let suite = Self {
            root: tmp.join("root"),
            bases: tmp.join("bases"),
            docker_sock: tmp.join("docker.sock"),
            docker_config: tmp.join("docker-config"),
            dockerd_log: tmp.join("dockerd.log"),
            plugin_log: tmp.join("plugin.log"),
            tmp,
            cgroup_parent,
            resources,
            anchor: None,
            anchor_pid: 0,
            dockerd: None,
            plugin: None,
            busybox: PathBuf::new(),
            seq: 0,
        };
        for dir in [&suite.bases, &suite.docker_config] {
            fs::create_dir_all(dir).ctx(format!("creating {}", dir.display()))?;
        }
        Ok(suite)
    }

    /// Starts the namespace, dockerd and the plugin, and builds the image.
    fn start(&mut self) -> Res {
        self.check_prerequisites()?;
        self.start_anchor()?;
        self.start_dockerd()?;
        self.start_plugin(&[])?;
        self.build_image()
    }

    fn check_prerequisites(&mut self) -> Res {
        ensure!(
            rustix::process::geteuid().is_root(),
            "the Docker end-to-end tests must run as root (they start a private dockerd): sudo -E cargo test --test docker, or scripts/test"
        );
        require_programs(&DOCKER_PROGRAMS)?;
        require_programs(&[("systemd-socket-activate", "systemd")])?;
        self.busybox = find_busybox()?;
        Ok(())
    }

    /// Private tmpfs mounts inside the namespace, hiding host state from dockerd:
    /// - `/run/docker/plugins`: dockerd discovers only our plugin socket;
    /// - `/etc/docker`: dockerd 20.10 writes its trust key `key.json` there and reads plugin
    ///   specs from `/etc/docker/plugins`;
    /// - `/run/containerd`: dockerd uses a system containerd whose socket it finds there
    ///   instead of starting its own (that containerd and its containers would live outside
    ///   our namespace), and containerd 1.6 puts its shims' sockets in `/run/containerd/s`.
    const PRIVATE_TMPFS: [&str; 3] = ["/run/docker/plugins", "/etc/docker", "/run/containerd"];

    fn start_anchor(&mut self) -> Res {
        // Missing mount points are created on the host, and removed at teardown.
        let mut targets = Vec::new();
        for dir in Self::PRIVATE_TMPFS {
            let dir = PathBuf::from(dir);
            create_missing_dirs(&dir, |d| self.resources.lock().unwrap().made_dirs.push(d))?;
            targets.push(dir);
        }
        let child = spawn_logged(&mut anchor_command(), &self.tmp.join("anchor.log"))?;
        self.anchor_pid = child.id();
        self.resources.lock().unwrap().anchor_pid = Some(child.id());
        self.anchor = Some(child);
        let own = own_ns();
        let pid = self.anchor_pid;
        ensure!(
            wait_until(Duration::from_secs(10), || ns_of(pid)
                .is_some_and(|ns| ns != own)),
            "the anchor process did not enter a new mount namespace: {}",
            tail(&self.tmp.join("anchor.log"), 10)
        );
        self.resources.lock().unwrap().ns = ns_of(pid);
        for target in targets {
            let out = run_cmd(
                self.ns_command("mount")
                    .args(["-t", "tmpfs", "-o", "mode=0755,size=1m", "dot-e2e"])
                    .arg(&target),
                CMD_TIMEOUT,
            )?;
            ensure!(
                out.success(),
                "mounting a tmpfs on {} in the namespace failed: {}",
                target.display(),
                out.stderr
            );
        }
        Ok(())
    }

    /// `nsenter -t ANCHOR -m -- program`.
    fn ns_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        nsenter(self.anchor_pid, program)
    }

    fn start_dockerd(&mut self) -> Res {
        self.start_dockerd_with(&[])
    }

    /// Starts dockerd with the suite's flags and `extra` (e.g. `--live-restore`); waits until
    /// it answers.
    fn start_dockerd_with(&mut self, extra: &[&str]) -> Res {
        write(&self.tmp.join("daemon.json"), "{}\n")?;
        let t = &self.tmp;
        let mut cmd = self.ns_command("dockerd");
        private_dockerd_args(&mut cmd, t, &self.docker_sock, &self.cgroup_parent).args(extra);
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.dockerd_log)
            .and_then(|mut f| writeln!(f, "===== test harness: starting {cmd:?}"));
        self.dockerd = Some(spawn_logged(&mut cmd, &self.dockerd_log)?);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.dockerd.as_mut().unwrap().try_wait().ctx("dockerd")? {
                return Err(format!("dockerd exited at start ({status}); see its log"));
            }
            if self.docker_sock.exists() {
                let out = run_cmd(
                    self.docker_cmd()
                        .args(["version", "--format", "{{.Server.Version}}"]),
                    Duration::from_secs(10),
                );
                if out.is_ok_and(|o| o.success()) {
                    return Ok(());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "dockerd did not answer within 60 s; see its log"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn plugin_socket(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{PLUGIN_SOCKET}", self.anchor_pid))
    }

    /// Starts `docker-on-top --root ROOT EXTRA...` in the namespace and waits until it serves.
    fn start_plugin(&mut self, extra: &[&str]) -> Res {
        let mut cmd = self.ns_command(PLUGIN_BIN);
        cmd.arg("--root").arg(&self.root).args(extra);
        let child = self.spawn_plugin(&mut cmd)?;
        self.plugin = Some(child);
        self.wait_plugin_socket(true)
    }

    fn spawn_plugin(&self, cmd: &mut Command) -> Res<Child> {
        plugin_env(cmd);
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.plugin_log)
            .and_then(|mut f| writeln!(f, "===== test harness: starting {cmd:?}"));
        spawn_logged(cmd, &self.plugin_log)
    }

    /// Waits until the socket exists (and, with `connect`, accepts a connection).
    fn wait_plugin_socket(&mut self, connect: bool) -> Res {
        let sock = self.plugin_socket();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .plugin
                .as_mut()
                .ok_or("no plugin process")?
                .try_wait()
                .ctx("plugin")?
            {
                return Err(format!(
                    "the plugin exited at start ({status}); see its log"
                ));
            }
            let ready = fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket())
                && (!connect || std::os::unix::net::UnixStream::connect(&sock).is_ok());
            if ready {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the plugin socket {PLUGIN_SOCKET} did not appear within 20 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the plugin with `signal` and reaps it.
    fn stop_plugin(&mut self, signal: Signal) -> Res {
        let Some(mut child) = self.plugin.take() else {
            return Ok(());
        };
        kill(child.id(), signal);
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(_) => Ok(()),
            Err(_) => {
                kill(pid, Signal::KILL);
                let _ = rx.recv();
                Err("the plugin did not exit within 15 s of being signalled".into())
            }
        }
    }

    /// Whether the current plugin process still runs (reaping it if it has exited).
    fn plugin_alive(&mut self) -> Res {
        match self.plugin.as_mut() {
            None => Err("no plugin process is running".into()),
            Some(child) => match child.try_wait().ctx("plugin")? {
                None => Ok(()),
                Some(status) => {
                    self.plugin = None;
                    Err(format!("the plugin exited unexpectedly ({status})"))
                }
            },
        }
    }

    fn build_image(&mut self) -> Res {
        let rootfs = self.tmp.join("image/rootfs");
        busybox_rootfs(&self.busybox, &rootfs)?;
        for dir in ["etc", "root", "home/user", "data/sub"] {
            fs::create_dir_all(rootfs.join(dir)).ctx(format!("creating rootfs/{dir}"))?;
        }
        std::os::unix::fs::chown(rootfs.join("home/user"), Some(1000), Some(1000))
            .ctx("chown rootfs/home/user")?;
        write(
            &rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
        )?;
        write(&rootfs.join("etc/group"), "root:x:0:\nuser:x:1000:\n")?;
        // Content at a mount target, for scenario 8.
        write(&rootfs.join("data/from-image.txt"), "from the image\n")?;
        write(&rootfs.join("data/sub/deep.txt"), "deep in the image\n")?;
        let tar = self.tmp.join("image/rootfs.tar");
        tar_dir(&rootfs, &tar)?;
        self.docker_ok(&["import", &tar.to_string_lossy(), IMAGE])?;
        let who = self.run(&[], &[], "id -u user && cat /data/from-image.txt")?;
        ensure!(
            who == "1000\nfrom the image\n",
            "the test image does not work (is /bin/busybox static?): {who:?}"
        );
        Ok(())
    }

    /// Stops containers, dockerd and the plugin gracefully, then destroys what is left.
    fn teardown(&mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.dockerd.is_some()
            && self.docker_sock.exists()
            && let Err(e) = self.remove_all_containers()
        {
            warnings.push(format!("removing containers: {e}"));
        }
        // dockerd first, so that the plugin can still answer its last calls.
        if let Some(mut dockerd) = self.dockerd.take() {
            kill(dockerd.id(), Signal::TERM);
            let pid = dockerd.id();
            let stopped = wait_until(Duration::from_secs(20), || {
                dockerd.try_wait().ok().flatten().is_some()
            });
            if !stopped {
                warnings.push("dockerd did not stop within 20 s of SIGTERM; killed".into());
                kill(pid, Signal::KILL);
                let _ = dockerd.wait();
            }
        }
        if let Err(e) = self.stop_plugin(Signal::TERM) {
            warnings.push(e);
        }
        warnings.extend(self.resources.lock().unwrap().destroy());
        if let Some(mut anchor) = self.anchor.take() {
            let _ = anchor.wait();
        }
        warnings
    }

    fn remove_all_containers(&self) -> Res {
        let out = self.docker_ok(&["ps", "-aq"])?;
        let ids: Vec<&str> = out.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            self.docker_ok(&args)?;
        }
        Ok(())
    }

    // ----- docker helpers ----------------------------------------------------------------------

    fn docker_cmd(&self) -> Command {
        docker_command(&self.docker_sock, &self.docker_config)
    }

    fn docker(&self, args: &[&str]) -> Res<Output> {
        run_cmd(self.docker_cmd().args(args), CMD_TIMEOUT)
    }

    /// Runs `docker ARGS`, which must succeed; returns its stdout.
    fn docker_ok(&self, args: &[&str]) -> Res<String> {
        let out = self.docker(args)?;
        ensure!(
            out.success(),
            "`docker {}` failed ({:?}): {}{}",
            args.join(" "),
            out.code,
            out.stderr.trim(),
            stdout_suffix(&out.stdout)
        );
        Ok(out.stdout)
    }

    /// Runs `docker ARGS`, which must fail; returns its stderr.
    fn docker_fails(&self, args: &[&str]) -> Res<String> {
        let out = self.docker(args)?;
        ensure!(
            !out.success(),
            "`docker {}` succeeded but should have failed; stdout: {}",
            args.join(" "),
            out.stdout.trim()
        );
        Ok(out.stderr)
    }

    fn unique(&mut self, tag: &str) -> String {
        self.seq += 1;
        format!("e2e-{tag}-{}", self.seq)
    }

    /// A fresh base directory `bases/DIR` holding `files` (relative path, content).
    fn base(&self, dir: &str, files: &[(&str, &str)]) -> Res<PathBuf> {
        check_interrupted()?;
        make_tree(&self.bases.join(dir), files)
    }

    /// Creates a docker-on-top volume; returns its name.
    fn volume(&mut self, tag: &str, base: &Path, volatile: bool) -> Res<String> {
        let name = self.unique(tag);
        let base_opt = format!("base={}", base.display());
        let volatile_opt = format!("volatile={volatile}");
        self.docker_ok(&[
            "volume",
            "create",
            "--driver",
            DRIVER,
            "--opt",
            &base_opt,
            "--opt",
            &volatile_opt,
            &name,
        ])?;
        Ok(name)
    }

    /// `docker run --rm --network none EXTRA -v M... IMAGE sh -c SCRIPT`; must succeed.
    fn run(&self, extra: &[&str], mounts: &[String], script: &str) -> Res<String> {
        let mut args = vec!["run", "--rm", "--network", "none"];
        args.extend_from_slice(extra);
        for m in mounts {
            args.extend(["-v", m.as_str()]);
        }
        args.extend([IMAGE, "sh", "-c", script]);
        self.docker_ok(&args)
    }

    /// Starts a long-running container with `mounts`; returns its name.
    fn start_container(&mut self, tag: &str, mounts: &[String]) -> Res<String> {
        let name = self.unique(tag);
        let mut args = vec!["run", "-d", "--network", "none", "--name", &name];
        for m in mounts {
            args.extend(["-v", m.as_str()]);
        }
        args.extend([IMAGE, "sh", "-c", LONG_RUNNING]);
        self.docker_ok(&args)?;
        Ok(name)
    }

    fn exec(&self, container: &str, script: &str) -> Res<String> {
        self.docker_ok(&["exec", container, "sh", "-c", script])
    }

    fn stop(&self, container: &str) -> Res {
        self.docker_ok(&["stop", "-t", "10", container]).map(drop)
    }

    fn remove(&self, container: &str) -> Res {
        self.docker_ok(&["rm", "-f", container]).map(drop)
    }

    fn inspect(&self, volume: &str) -> Res<Value> {
        let out = self.docker_ok(&["volume", "inspect", volume])?;
        let v: Value = serde_json::from_str(&out).ctx(format!("parsing {out:?}"))?;
        v.get(0)
            .cloned()
            .ok_or_else(|| format!("docker volume inspect printed no volume: {out}"))
    }

    fn vol_dir(&self, volume: &str) -> PathBuf {
        self.root.join(volume)
    }

    fn upper(&self, volume: &str) -> PathBuf {
        let changes = self.vol_dir(volume).join("changes");
        if changes.is_dir() {
            // A sized volume's: in its image's file system, mounted in the plugin's namespace.
            let rel = changes.join("upper");
            let rel = rel.strip_prefix("/").unwrap_or(&rel).to_owned();
            PathBuf::from(format!("/proc/{}/root", self.anchor_pid)).join(rel)
        } else {
            self.vol_dir(volume).join("upper")
        }
    }

    /// Loop devices whose backing file is in the plugin's state root.
    fn loop_devices(&self) -> Res<Vec<String>> {
        let mut found = Vec::new();
        for entry in fs::read_dir("/sys/block").ctx("reading /sys/block")? {
            let entry = entry.ctx("reading /sys/block")?;
            if let Ok(file) = fs::read_to_string(entry.path().join("loop/backing_file"))
                && Path::new(file.trim()).starts_with(&self.root)
            {
                found.push(file.trim().to_owned());
            }
        }
        Ok(found)
    }

    /// Whether an overlay is mounted on the volume's mountpoint in the test namespace.
    fn mounted(&self, volume: &str) -> Res<bool> {
        let target = self.vol_dir(volume).join("mountpoint");
        let info = read(Path::new(&format!("/proc/{}/mountinfo", self.anchor_pid)))?;
        Ok(info.lines().any(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let fstype = line.split(" - ").nth(1).and_then(|r| r.split(' ').next());
            fields.len() > 4
                && Path::new(&unescape_mountinfo(fields[4])) == target
                && fstype == Some("overlay")
        }))
    }

    fn expect_mounted(&self, volume: &str, want: bool, when: &str) -> Res {
        // dockerd's Unmount may trail the CLI's return by a moment (the plugin has unmounted
        // when it answers the last one).
        let ok = wait_until(Duration::from_secs(5), || {
            self.mounted(volume).is_ok_and(|m| m == want)
        });
        ensure!(
            ok,
            "volume {volume} should {}be mounted {when}, but is {}",
            if want { "" } else { "no longer " },
            if want { "not" } else { "still mounted" }
        );
        Ok(())
    }

    fn expect_file(&self, path: &Path, content: &str) -> Res {
        let got = read(path)?;
        ensure!(
            got == content,
            "{} holds {got:?}, expected {content:?}",
            path.display()
        );
        Ok(())
    }

    fn active_records(&self, volume: &str) -> Res<BTreeSet<String>> {
        let dir = self.vol_dir(volume).join("activemounts");
        if !dir.exists() {
            return Ok(BTreeSet::new());
        }
        entries(&dir)
    }

    /// The names in the plugin's state root.
    fn root_entries(&self) -> Res<BTreeSet<String>> {
        entries(&self.root)
    }

    fn trash_is_empty_soon(&self) -> Res {
        let trash = self.root.join(".trash");
        let ok = wait_until(Duration::from_secs(10), || {
            entries(&trash).is_ok_and(|e| e.is_empty())
        });
        ensure!(
            ok,
            "the plugin's .trash is not emptied: {:?}",
            entries(&trash)?
        );
        Ok(())
    }

    /// The volume's mount records: mount ID → usage count.
    fn records(&self, volume: &str) -> Res<BTreeMap<String, u64>> {
        let dir = self.vol_dir(volume).join("activemounts");
        let mut out = BTreeMap::new();
        for id in self.active_records(volume)? {
            let text = read(&dir.join(&id))?;
            if text.is_empty() {
                // A new mount ID's record before its details are written: one use.
                out.insert(id, 1);
                continue;
            }
            let record: Value = serde_json::from_str(&text).ctx(format!("parsing record {id}"))?;
            let uses = record["UsageCount"]
                .as_u64()
                .ok_or_else(|| format!("record {id} without a UsageCount: {text}"))?;
            out.insert(id, uses);
        }
        Ok(out)
    }

    /// The pid (in our pid namespace) of a running container's first process.
    fn container_pid(&self, container: &str) -> Res<u32> {
        let out = self.docker_ok(&["inspect", "-f", "{{.State.Pid}}", container])?;
        let pid: u32 = out
            .trim()
            .parse()
            .ctx(format!("pid of {container}: {out:?}"))?;
        ensure!(pid != 0, "container {container} is not running");
        Ok(pid)
    }

    /// Processes in the test namespace: (pid, command).
    fn ns_processes(&self) -> Vec<(u32, String)> {
        let Some(ns) = ns_of(self.anchor_pid) else {
            return Vec::new();
        };
        let mut out: Vec<(u32, String)> = pids_in_ns(&ns)
            .into_iter()
            .map(|pid| (pid, comm(pid)))
            .collect();
        out.sort();
        out
    }

    /// `kill -9` dockerd and reap it. dockerd's own containerd gets SIGKILL with it (its
    /// parent-death signal); the shims and the containers live on.
    fn kill9_dockerd(&mut self) -> Res {
        let mut dockerd = self.dockerd.take().ok_or("dockerd is not running")?;
        let containerd_pid = fs::read_to_string(self.tmp.join("exec/containerd/containerd.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        kill(dockerd.id(), Signal::KILL);
        dockerd.wait().ctx("reaping dockerd")?;
        // The restarted dockerd starts a new containerd only once the old pid is gone: a
        // dead containerd not yet reaped by pid 1 (a zombie) counts as "still running", and
        // dockerd then waits for its socket in vain.
        if let Some(pid) = containerd_pid {
            let reaped = wait_until(Duration::from_secs(30), || {
                !Path::new(&format!("/proc/{pid}")).exists()
            });
            ensure!(
                reaped,
                "dockerd's containerd (pid {pid}) is still there 30 s after dockerd's kill -9 (state {:?})",
                fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Stops dockerd with SIGTERM (as `systemctl stop docker` does) and reaps it.
    fn stop_dockerd(&mut self) -> Res {
        let Some(mut dockerd) = self.dockerd.take() else {
            return Ok(());
        };
        kill(dockerd.id(), Signal::TERM);
        let pid = dockerd.id();
        let stopped = wait_until(Duration::from_secs(30), || {
            dockerd.try_wait().ok().flatten().is_some()
        });
        if !stopped {
            kill(pid, Signal::KILL);
            let _ = dockerd.wait();
            return Err("dockerd did not stop within 30 s of SIGTERM".into());
        }
        Ok(())
    }
}

/// `/proc/PID/comm`, empty when the process is gone.
fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default()
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

impl Drop for Suite {
    fn drop(&mut self) {
        for w in self.teardown() {
            eprintln!("docker e2e: teardown: {w}");
        }
    }
}

// ----- Scenarios --------------------------------------------------------------------------------

fn mount(volume: &str, target: &str) -> String {
    format!("{volume}:{target}")
}

/// 1. A container reads the base, deletes, changes and adds; the base is unchanged; a second
///    container sees the changes; `upper/` holds them.
fn basic(s: &mut Suite) -> Res {
    let base = s.base(
        "basic",
        &[
            ("keep.txt", "keep\n"),
            ("delete.txt", "delete me\n"),
            ("change.txt", "original\n"),
            ("sub/nested.txt", "nested\n"),
        ],
    )?;
    let before = snapshot(&base)?;
    let vol = s.volume("basic", &base, false)?;
    let out = s.run(
        &[],
        &[mount(&vol, "/x")],
        "cat /x/keep.txt /x/sub/nested.txt /x/change.txt && rm /x/delete.txt && \
         echo changed > /x/change.txt && echo added > /x/added.txt",
    )?;
    ensure!(
        out == "keep\nnested\noriginal\n",
        "the first container read {out:?} from the base"
    );
    ensure!(snapshot(&base)? == before, "the host's base changed");
    s.expect_mounted(&vol, false, "after its only container exited")?;
    let out = s.run(
        &[],
        &[mount(&vol, "/x")],
        "ls /x; cat /x/change.txt /x/added.txt /x/keep.txt; test -e /x/delete.txt && echo STILL-THERE; true",
    )?;
    ensure!(
        out == "added.txt\nchange.txt\nkeep.txt\nsub\nchanged\nadded\nkeep\n",
        "the second container saw {out:?}"
    );
    let upper = s.upper(&vol);
    s.expect_file(&upper.join("change.txt"), "changed\n")?;
    s.expect_file(&upper.join("added.txt"), "added\n")?;
    ensure!(
        is_whiteout(&upper.join("delete.txt")),
        "upper/delete.txt is not a whiteout (0/0 character device)"
    );
    ensure!(
        !upper.join("keep.txt").exists(),
        "upper/ holds an unchanged file"
    );
    ensure!(snapshot(&base)? == before, "the host's base changed");
    Ok(())
}

/// 15. A sized volume (`-o size=`): writing past the cap fails with ENOSPC inside the container
///     while the host, the base and other volumes are unaffected; the data stays (persistent)
///     or goes (volatile) across containers; `docker volume rm` leaves no loop device or image.
fn sized(s: &mut Suite) -> Res {
    let base = s.base("sized", &[("base.txt", "base\n")])?;
    let before = snapshot(&base)?;
    let root = s.root.clone();
    let free = move || -> Res<u64> {
        let st = rustix::fs::statvfs(&root).map_err(|e| format!("statvfs: {e}"))?;
        Ok(st.f_bavail * st.f_frsize)
    };
    let loops_before = s.loop_devices()?;
    let make = |s: &mut Suite, tag: &str, volatile: bool| -> Res<String> {
        let name = s.unique(tag);
        let base_opt = format!("base={}", base.display());
        s.docker_ok(&[
            "volume",
            "create",
            "--driver",
            DRIVER,
            "-o",
            &base_opt,
            "-o",
            "size=32Mi",
            "-o",
            &format!("volatile={volatile}"),
            &name,
        ])?;
        Ok(name)
    };
    let vol = make(s, "sized", false)?;
    let other_base = s.base("sized-other", &[])?;
    let other = s.volume("sized-other", &other_base, false)?;
    let free_before = free()?;
    let out = s.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        &mount(&vol, "/d"),
        IMAGE,
        "sh",
        "-c",
        "dd if=/dev/zero of=/d/big bs=1M count=64 2>&1; echo rc=$?",
    ])?;
    ensure!(
        out.stdout.contains("No space left on device") && !out.stdout.contains("rc=0"),
        "writing 64 MiB into a 32 MiB volume: {}{}",
        out.stdout,
        out.stderr
    );
    let dropped = free_before.saturating_sub(free()?);
    ensure!(
        dropped <= 40 << 20,
        "the host's free space dropped by {dropped} bytes, more than the 32 MiB cap"
    );
    s.run(&[], &[mount(&other, "/x")], "echo ok > /x/f && cat /x/f")?;
    ensure!(snapshot(&base)? == before, "the host's base changed");
    let out = s.run(
        &[],
        &[mount(&vol, "/d")],
        "cat /d/base.txt; test -s /d/big && echo kept",
    )?;
    ensure!(out == "base\nkept\n", "the next container saw {out:?}");
    let status = s.inspect(&vol)?["Status"].clone();
    ensure!(
        status["Size"] == serde_json::json!(32u64 << 20) && status["Fs"] == "ext4",
        "docker volume inspect shows {status}"
    );
    ensure!(
        status["Used"].as_u64().is_some_and(|u| u > 16 << 20),
        "Used does not show what was written: {status}"
    );

    let scratch = make(s, "sized-volatile", true)?;
    s.run(&[], &[mount(&scratch, "/d")], "echo tmp > /d/tmp.txt")?;
    // Detached by the last Unmount; still there for the admin commands, which attach it.
    let out = run_cmd(
        s.ns_command(PLUGIN_BIN)
            .args(["changes", "--root"])
            .arg(&s.root)
            .arg(&scratch),
        CMD_TIMEOUT,
    )?;
    ensure!(
        out.success() && out.stdout == "A /tmp.txt\n",
        "docker-on-top changes of the volatile sized volume: {}{}",
        out.stdout,
        out.stderr
    );
    let out = s.run(&[], &[mount(&scratch, "/d")], "ls /d")?;
    ensure!(
        out == "base.txt\n",
        "the volatile sized volume kept {out:?}"
    );

    for v in [&vol, &scratch, &other] {
        s.docker_ok(&["volume", "rm", v])?;
    }
    let loops = s.loop_devices()?;
    ensure!(loops == loops_before, "loop devices left: {loops:?}");
    for v in [&vol, &scratch] {
        ensure!(
            !s.vol_dir(v).exists(),
            "{v}'s directory (and image) is still there"
        );
    }
    s.trash_is_empty_soon()
}

/// 2. Volatile: changes are shared by containers running at the same time, still in `upper/`
///    after the last one exits, and gone for the next container.
fn volatile(s: &mut Suite) -> Res {
    let base = s.base("volatile", &[("file.txt", "base\n")])?;
    let before = snapshot(&base)?;
    let vol = s.volume("volatile", &base, true)?;
    let a = s.start_container("volatile-a", &[mount(&vol, "/x")])?;
    let b = s.start_container("volatile-b", &[mount(&vol, "/x")])?;
    s.exec(&a, "echo from-a > /x/a.txt && echo modified > /x/file.txt")?;
    let out = s.exec(&b, "cat /x/a.txt /x/file.txt && echo from-b > /x/b.txt")?;
    ensure!(
        out == "from-a\nmodified\n",
        "container b saw {out:?} instead of a's changes"
    );
    let out = s.exec(&a, "cat /x/b.txt")?;
    ensure!(
        out == "from-b\n",
        "container a saw {out:?} instead of b's file"
    );
    s.stop(&a)?;
    s.expect_mounted(&vol, true, "while container b still runs")?;
    let out = s.exec(&b, "cat /x/a.txt && echo later > /x/later.txt")?;
    ensure!(
        out == "from-a\n",
        "b lost a's change when a stopped: {out:?}"
    );
    s.stop(&b)?;
    s.expect_mounted(&vol, false, "after the last container stopped")?;
    let upper = s.upper(&vol);
    for (file, content) in [
        ("a.txt", "from-a\n"),
        ("b.txt", "from-b\n"),
        ("file.txt", "modified\n"),
        ("later.txt", "later\n"),
    ] {
        s.expect_file(&upper.join(file), content)
            .map_err(|e| format!("after the last container exited: {e}"))?;
    }
    let out = s.run(&[], &[mount(&vol, "/x")], "ls /x; cat /x/file.txt")?;
    ensure!(
        out == "file.txt\nbase\n",
        "the next container saw {out:?} instead of the pristine base"
    );
    ensure!(
        !upper.join("a.txt").exists(),
        "the discarded changes are still in upper/"
    );
    ensure!(snapshot(&base)? == before, "the host's base changed");
    s.remove(&a)?;
    s.remove(&b)?;
    Ok(())
}

/// 3. Two containers at once share changes live; stopping one leaves the other working.
fn live_sharing(s: &mut Suite) -> Res {
    let base = s.base("live", &[("base.txt", "base\n")])?;
    let vol = s.volume("live", &base, false)?;
    let a = s.start_container("live-a", &[mount(&vol, "/x")])?;
    let b = s.start_container("live-b", &[mount(&vol, "/x")])?;
    s.exec(&a, "echo 1 > /x/shared.txt")?;
    let out = s.exec(&b, "cat /x/shared.txt && echo 2 >> /x/shared.txt")?;
    ensure!(out == "1\n", "b saw {out:?} instead of a's write");
    let out = s.exec(
        &a,
        "cat /x/shared.txt && mkdir /x/dir && echo in-dir > /x/dir/f",
    )?;
    ensure!(out == "1\n2\n", "a saw {out:?} instead of b's append");
    let out = s.exec(&b, "cat /x/dir/f && rm /x/base.txt")?;
    ensure!(out == "in-dir\n", "b saw {out:?}");
    let out = s.exec(&a, "ls /x")?;
    ensure!(
        out == "dir\nshared.txt\n",
        "a does not see b's delete: {out:?}"
    );
    s.stop(&b)?;
    s.remove(&b)?;
    s.expect_mounted(&vol, true, "while container a still runs")?;
    let out = s.exec(&a, "echo 3 >> /x/shared.txt && cat /x/shared.txt /x/dir/f")?;
    ensure!(out == "1\n2\n3\nin-dir\n", "a after b stopped: {out:?}");
    let st = s.inspect(&vol)?;
    ensure!(
        st["Status"]["ActiveMounts"] == 1,
        "ActiveMounts should be 1 with one container left: {}",
        st["Status"]
    );
    s.stop(&a)?;
    s.remove(&a)?;
    s.expect_mounted(&vol, false, "after both containers stopped")?;
    s.expect_file(&s.upper(&vol).join("shared.txt"), "1\n2\n3\n")?;
    ensure!(
        s.active_records(&vol)?.is_empty(),
        "mount records left behind"
    );
    Ok(())
}

/// 4. `docker cp` into and out of a running container that uses the volume, then another
///    container on the same volume: nothing is wiped or unmounted under the running one.
fn docker_cp(s: &mut Suite) -> Res {
    let base = s.base("cp", &[("base.txt", "base\n")])?;
    let vol = s.volume("cp", &base, false)?;
    let a = s.start_container("cp-a", &[mount(&vol, "/x")])?;
    s.exec(&a, "echo live > /x/live.txt")?;
    let into = s.tmp.join("cp-in.txt");
    write(&into, "copied in\n")?;
    s.docker_ok(&["cp", &into.to_string_lossy(), &format!("{a}:/x/cp-in.txt")])?;
    let out = s.exec(&a, "cat /x/cp-in.txt /x/live.txt /x/base.txt")?;
    ensure!(
        out == "copied in\nlive\nbase\n",
        "after docker cp into the container, it sees {out:?}"
    );
    for (file, content) in [("live.txt", "live\n"), ("base.txt", "base\n")] {
        let out_path = s.tmp.join(format!("cp-out-{file}"));
        s.docker_ok(&["cp", &format!("{a}:/x/{file}"), &out_path.to_string_lossy()])?;
        s.expect_file(&out_path, content)?;
    }
    s.expect_mounted(&vol, true, "after docker cp while the container runs")?;
    let st = s.inspect(&vol)?;
    ensure!(
        st["Status"]["ActiveMounts"] == 1,
        "docker cp left the mount count at {} (expected 1)",
        st["Status"]["ActiveMounts"]
    );
    let out = s.run(
        &[],
        &[mount(&vol, "/x")],
        "cat /x/cp-in.txt /x/live.txt && echo from-b > /x/b.txt",
    )?;
    ensure!(out == "copied in\nlive\n", "a second container saw {out:?}");
    s.expect_mounted(&vol, true, "after a second container came and went")?;
    let out = s.exec(
        &a,
        "cat /x/b.txt /x/cp-in.txt /x/live.txt && echo after > /x/after.txt && cat /x/after.txt",
    )?;
    ensure!(
        out == "from-b\ncopied in\nlive\nafter\n",
        "the running container lost its view: {out:?}"
    );
    s.stop(&a)?;
    s.remove(&a)?;
    s.expect_mounted(&vol, false, "after the container stopped")?;
    let upper = s.upper(&vol);
    for (file, content) in [
        ("cp-in.txt", "copied in\n"),
        ("live.txt", "live\n"),
        ("b.txt", "from-b\n"),
        ("after.txt", "after\n"),
    ] {
        s.expect_file(&upper.join(file), content)?;
    }
    ensure!(
        s.active_records(&vol)?.is_empty(),
        "mount records left behind"
    );
    Ok(())
}

/// 5. `docker run --user 1000` can create files at the volume's root when the base is owned
///    by uid 1000, also after a volatile volume's discard.
fn non_root_user(s: &mut Suite) -> Res {
    for volatile in [false, true] {
        let base = s.base(
            &format!("user-{volatile}"),
            &[("owned.txt", "owned by 1000\n")],
        )?;
        std::os::unix::fs::chown(&base, Some(1000), Some(1000)).ctx("chown base")?;
        std::os::unix::fs::chown(base.join("owned.txt"), Some(1000), Some(1000))
            .ctx("chown base file")?;
        fs::set_permissions(&base, fs::Permissions::from_mode(0o770)).ctx("chmod base")?;
        let vol = s.volume("user", &base, volatile)?;
        for round in 0..2 {
            let out = s
                .run(
                    &["--user", "1000"],
                    &[mount(&vol, "/x")],
                    &format!(
                        "id -u && touch /x/new-{round} && mkdir /x/dir-{round} && \
                     echo more >> /x/owned.txt && stat -c '%u %a' /x"
                    ),
                )
                .map_err(|e| format!("volatile={volatile}, round {round}: {e}"))?;
            ensure!(
                out == "1000\n1000 770\n",
                "volatile={volatile}, round {round}: the container saw {out:?} (uid, root owner and mode)"
            );
            let created = s.upper(&vol).join(format!("new-{round}"));
            let meta = fs::metadata(&created).ctx(format!("volatile={volatile}"))?;
            ensure!(
                meta.uid() == 1000,
                "{} is owned by {}",
                created.display(),
                meta.uid()
            );
        }
        ensure!(
            read(&base.join("owned.txt"))? == "owned by 1000\n",
            "the base file changed"
        );
    }
    Ok(())
}

/// 6. Bases whose paths contain spaces, commas, colons (and `=`, `\`), with both mount APIs.
fn special_paths(s: &mut Suite) -> Res {
    let names = [
        "with space",
        "with,comma",
        "with:colon",
        "all of: them, here=\\there",
    ];
    for (api, extra) in [
        ("new mount API", &[][..]),
        ("legacy mount(2)", &["--legacy-mount-api"][..]),
    ] {
        if !extra.is_empty() {
            s.stop_plugin(Signal::TERM)?;
            s.start_plugin(extra)?;
        }
        for (i, name) in names.iter().enumerate() {
            let dir = format!("special, dir: {i} {}/{name}", extra.len());
            let base = s.base(&dir, &[("f.txt", &format!("{name}\n"))])?;
            let vol = s
                .volume("special", &base, false)
                .map_err(|e| format!("{api}, base {}: {e}", base.display()))?;
            let st = s.inspect(&vol)?;
            ensure!(
                st["Status"]["Base"] == base.to_string_lossy().as_ref(),
                "{api}: Status.Base is {} for {}",
                st["Status"]["Base"],
                base.display()
            );
            let out = s
                .run(
                    &[],
                    &[mount(&vol, "/x")],
                    "cat /x/f.txt && echo new > /x/new.txt",
                )
                .map_err(|e| format!("{api}, base {}: {e}", base.display()))?;
            ensure!(
                out == format!("{name}\n"),
                "{api}, base {}: the container read {out:?}",
                base.display()
            );
            s.expect_file(&s.upper(&vol).join("new.txt"), "new\n")?;
            ensure!(
                !base.join("new.txt").exists(),
                "{api}: a write reached the base {}",
                base.display()
            );
        }
    }
    s.stop_plugin(Signal::TERM)?;
    s.start_plugin(&[])
}

/// 7. `docker volume inspect` shows a Mountpoint while in use, a real CreatedAt, and Status.
fn inspect(s: &mut Suite) -> Res {
    let base = s.base("inspect", &[("f", "f\n")])?;
    let before_create = SystemTime::now() - Duration::from_secs(2);
    let vol = s.volume("inspect", &base, true)?;
    let after_create = SystemTime::now() + Duration::from_secs(2);
    let idle = s.inspect(&vol)?;
    ensure!(idle["Driver"] == DRIVER, "Driver: {}", idle["Driver"]);
    ensure!(idle["Name"] == vol.as_str(), "Name: {}", idle["Name"]);
    ensure!(idle["Scope"] == "local", "Scope: {}", idle["Scope"]);
    ensure!(
        idle["Mountpoint"] == "",
        "Mountpoint while unused: {}",
        idle["Mountpoint"]
    );
    let created = idle["CreatedAt"].as_str().unwrap_or_default().to_owned();
    let t = humantime::parse_rfc3339_weak(&created)
        .map_err(|e| format!("CreatedAt {created:?} is not RFC 3339: {e}"))?;
    ensure!(
        t >= before_create && t <= after_create,
        "CreatedAt {created} is not the creation time"
    );
    let status = &idle["Status"];
    ensure!(
        status["Base"] == base.to_string_lossy().as_ref()
            && status["Volatile"] == true
            && status["Mounted"] == false
            && status["ActiveMounts"] == 0
            && status["UpperDir"] == s.upper(&vol).to_string_lossy().as_ref(),
        "Status while unused: {status}"
    );
    let a = s.start_container("inspect", &[mount(&vol, "/x")])?;
    let busy = s.inspect(&vol)?;
    let mountpoint = s.vol_dir(&vol).join("mountpoint");
    ensure!(
        busy["Mountpoint"] == mountpoint.to_string_lossy().as_ref(),
        "Mountpoint while in use: {} (expected {})",
        busy["Mountpoint"],
        mountpoint.display()
    );
    ensure!(
        s.mounted(&vol)?,
        "Mountpoint {} is not an overlay mount",
        mountpoint.display()
    );
    ensure!(
        busy["Status"]["Mounted"] == true && busy["Status"]["ActiveMounts"] == 1,
        "Status while in use: {}",
        busy["Status"]
    );
    ensure!(
        busy["CreatedAt"] == created.as_str(),
        "CreatedAt changed from {created} to {}",
        busy["CreatedAt"]
    );
    let listed = s.docker_ok(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("driver={DRIVER}"),
    ])?;
    ensure!(
        listed.lines().any(|l| l == vol),
        "docker volume ls does not list {vol}: {listed:?}"
    );
    s.stop(&a)?;
    s.remove(&a)?;
    s.expect_mounted(&vol, false, "after its container stopped")?;
    let after = s.inspect(&vol)?;
    ensure!(
        after["Mountpoint"] == ""
            && after["Status"]["Mounted"] == false
            && after["Status"]["ActiveMounts"] == 0,
        "after use: Mountpoint {} Status {}",
        after["Mountpoint"],
        after["Status"]
    );
    Ok(())
}

/// 8. Image content at the mount target. dockerd copies the image's files into a volume whose
///    view is empty when the container is created (Mount + copy + Unmount before the start).
///    Observed and documented behaviour (README "Image content at the mount target"):
///    - persistent volume, empty base: the image content is copied into the volume's changes
///      (upper/), the container sees it, and it stays like any other change; the base is
///      untouched;
///    - volatile volume, empty base: the copy is discarded before the container starts (its
///      mount is the first after the copy's unmount), so the container sees the empty base;
///      but when another container already uses the volume, the copy lands in the shared live
///      view and lasts until the last user stops;
///    - non-empty base (either kind): nothing is copied, the container sees the base;
///    - `-v VOL:/data:nocopy`: nothing is copied.
fn image_content(s: &mut Suite) -> Res {
    let list = "find /data | sort";
    let image_view = "/data\n/data/from-image.txt\n/data/sub\n/data/sub/deep.txt\n";

    // Persistent, empty base.
    let base = s.base("image-empty-persistent", &[])?;
    let vol = s.volume("image-p", &base, false)?;
    let out = s.run(&[], &[mount(&vol, "/data")], list)?;
    ensure!(
        out == image_view,
        "persistent volume, empty base: the container saw {out:?}, expected the image content"
    );
    s.expect_file(&s.upper(&vol).join("from-image.txt"), "from the image\n")
        .map_err(|e| format!("persistent volume, empty base: {e}"))?;
    ensure!(entries(&base)?.is_empty(), "the copy reached the base");
    let out = s.run(
        &[],
        &[mount(&vol, "/elsewhere")],
        "cat /elsewhere/from-image.txt",
    )?;
    ensure!(
        out == "from the image\n",
        "persistent volume: the copied content did not stay: {out:?}"
    );

    // Volatile, empty base.
    let base = s.base("image-empty-volatile", &[])?;
    let vol = s.volume("image-v", &base, true)?;
    let out = s.run(&[], &[mount(&vol, "/data")], list)?;
    ensure!(
        out == "/data\n",
        "volatile volume, empty base: the container saw {out:?}, expected the empty base (the create-time copy is discarded at the container's mount)"
    );
    ensure!(entries(&base)?.is_empty(), "the copy reached the base");
    // ... unless the volume is already in use: then the copy is part of the live view.
    let a = s.start_container("image-v-holder", &[mount(&vol, "/x")])?;
    let out = s.run(&[], &[mount(&vol, "/data")], list)?;
    ensure!(
        out == image_view,
        "volatile volume in use, empty base: the container saw {out:?}, expected the image content"
    );
    let out = s.exec(&a, "cat /x/from-image.txt")?;
    ensure!(
        out == "from the image\n",
        "the copy is not shared with the running container: {out:?}"
    );
    s.stop(&a)?;
    s.remove(&a)?;
    let out = s.run(&[], &[mount(&vol, "/elsewhere")], "find /elsewhere")?;
    ensure!(
        out == "/elsewhere\n",
        "volatile volume: the copy survived the last user: {out:?}"
    );

    // Non-empty base, both kinds.
    for volatile in [false, true] {
        let base = s.base(&format!("image-full-{volatile}"), &[("base.txt", "base\n")])?;
        let vol = s.volume("image-full", &base, volatile)?;
        let out = s.run(&[], &[mount(&vol, "/data")], list)?;
        ensure!(
            out == "/data\n/data/base.txt\n",
            "volatile={volatile}, non-empty base: the container saw {out:?}, expected only the base"
        );
        ensure!(
            entries(&s.upper(&vol))?.is_empty(),
            "volatile={volatile}, non-empty base: upper/ is not empty"
        );
    }

    // nocopy.
    let base = s.base("image-nocopy", &[])?;
    let vol = s.volume("image-nocopy", &base, false)?;
    let out = s.run(&[], &[format!("{vol}:/data:nocopy")], list)?;
    ensure!(out == "/data\n", "nocopy: the container saw {out:?}");
    ensure!(
        entries(&s.upper(&vol))?.is_empty(),
        "nocopy: upper/ is not empty"
    );
    Ok(())
}

/// 9. The plugin is killed while a container runs: the container keeps working; the plugin
///    restarts; the container's stop unmounts cleanly.
fn plugin_killed(s: &mut Suite) -> Res {
    let base = s.base("killed", &[("base.txt", "base\n")])?;
    let vol = s.volume("killed", &base, false)?;
    let a = s.start_container("killed", &[mount(&vol, "/x")])?;
    s.exec(&a, "echo 1 > /x/w1")?;
    s.stop_plugin(Signal::KILL)?;
    let out = s.exec(&a, "cat /x/w1 /x/base.txt && echo 2 > /x/w2 && cat /x/w2")?;
    ensure!(
        out == "1\nbase\n2\n",
        "with the plugin dead, the container saw {out:?}"
    );
    s.expect_mounted(&vol, true, "after the plugin was killed")?;
    s.start_plugin(&[])?;
    let out = s.exec(&a, "echo 3 > /x/w3 && cat /x/w1 /x/w2 /x/w3")?;
    ensure!(
        out == "1\n2\n3\n",
        "after the plugin restarted, the container saw {out:?}"
    );
    let st = s.inspect(&vol)?;
    ensure!(
        st["Status"]["Mounted"] == true && st["Status"]["ActiveMounts"] == 1,
        "the restarted plugin reports {}",
        st["Status"]
    );
    s.stop(&a)?;
    s.expect_mounted(
        &vol,
        false,
        "after the container stopped (Unmount to the restarted plugin)",
    )?;
    ensure!(
        s.active_records(&vol)?.is_empty(),
        "mount records left: {:?}",
        s.active_records(&vol)?
    );
    s.remove(&a)?;
    for (file, content) in [("w1", "1\n"), ("w2", "2\n"), ("w3", "3\n")] {
        s.expect_file(&s.upper(&vol).join(file), content)?;
    }
    let out = s.run(&[], &[mount(&vol, "/x")], "cat /x/w1 /x/w2 /x/w3")?;
    ensure!(out == "1\n2\n3\n", "the next container saw {out:?}");
    Ok(())
}

/// 10. Socket activation: `systemd-socket-activate` holds the plugin socket; the first docker
///     command starts the plugin, which keeps working.
fn socket_activation(s: &mut Suite) -> Res {
    s.stop_plugin(Signal::TERM)?;
    let sock = s.plugin_socket();
    if fs::symlink_metadata(&sock).is_ok() {
        fs::remove_file(&sock).ctx("removing the old socket")?;
    }
    let mut cmd = s.ns_command("systemd-socket-activate");
    cmd.arg("-l")
        .arg(PLUGIN_SOCKET)
        .arg(PLUGIN_BIN)
        .arg("--root")
        .arg(&s.root);
    let child = s.spawn_plugin(&mut cmd)?;
    let pid = child.id();
    s.plugin = Some(child);
    s.wait_plugin_socket(false)?;
    let exe = |pid: u32| {
        fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let before = exe(pid);
    ensure!(
        before.ends_with("systemd-socket-activate"),
        "before any request, the process is {before:?}, not systemd-socket-activate"
    );
    let base = s.base("activated", &[("base.txt", "base\n")])?;
    let vol = s.volume("activated", &base, false)?;
    let after = exe(pid);
    ensure!(
        Path::new(&after) == fs::canonicalize(PLUGIN_BIN).unwrap_or_default(),
        "after the first docker command, the activated process is {after:?}, not the plugin"
    );
    s.plugin_alive()?;
    let out = s.run(
        &[],
        &[mount(&vol, "/x")],
        "cat /x/base.txt && echo activated > /x/new.txt",
    )?;
    ensure!(out == "base\n", "the container saw {out:?}");
    let out = s.run(&[], &[mount(&vol, "/x")], "cat /x/new.txt")?;
    ensure!(out == "activated\n", "the next container saw {out:?}");
    s.expect_mounted(&vol, false, "after the containers exited")?;
    let log = read(&s.plugin_log)?;
    ensure!(
        log.contains("socket activated"),
        "the plugin did not log that it was socket activated"
    );
    s.plugin_alive()
}

/// 11. Bad input through the docker CLI prints a clear error and leaves nothing on disk.
fn bad_input(s: &mut Suite) -> Res {
    let good = s.base("bad-input", &[("f", "f\n")])?;
    let file = s.bases.join("a-file");
    write(&file, "not a directory\n")?;
    let good = good.to_string_lossy().into_owned();
    let missing = s
        .bases
        .join("does-not-exist")
        .to_string_lossy()
        .into_owned();
    let inside_root = s.root.to_string_lossy().into_owned();
    let existing = s.volume("bad-existing", Path::new(&good), false)?;
    let file = file.to_string_lossy().into_owned();
    let cases: Vec<(&str, String, Vec<String>, Vec<&str>)> = vec![
        (
            "invalid name",
            "bad name!".into(),
            vec![format!("base={good}")],
            vec!["bad name!", "letters, digits"],
        ),
        (
            "name starting with a dot",
            ".hidden".into(),
            vec![format!("base={good}")],
            vec!["start with a letter or digit"],
        ),
        (
            "no base",
            "e2e-bad-nobase".into(),
            vec![],
            vec!["base", "required"],
        ),
        (
            "relative base",
            "e2e-bad-relative".into(),
            vec!["base=relative/dir".into()],
            vec!["relative/dir", "not an absolute path"],
        ),
        (
            "missing base",
            "e2e-bad-missing".into(),
            vec![format!("base={missing}")],
            vec!["does-not-exist", "no such file or directory"],
        ),
        (
            "base is a file",
            "e2e-bad-file".into(),
            vec![format!("base={file}")],
            vec!["a-file", "not a directory"],
        ),
        (
            "base inside the state root",
            "e2e-bad-root".into(),
            vec![format!("base={inside_root}")],
            vec!["overlaps the state directory"],
        ),
        (
            "unknown option",
            "e2e-bad-option".into(),
            vec![format!("base={good}"), "colour=blue".into()],
            vec!["unknown option", "colour", "base, volatile"],
        ),
        (
            "bad volatile value",
            "e2e-bad-volatile".into(),
            vec![format!("base={good}"), "volatile=maybe".into()],
            vec!["volatile", "maybe", "true, false, yes or no"],
        ),
    ];
    let before = s.root_entries()?;
    let existing_before = snapshot(&s.vol_dir(&existing))?;
    for (what, name, opts, keywords) in &cases {
        let mut args = vec!["volume", "create", "--driver", DRIVER];
        for o in opts {
            args.extend(["--opt", o.as_str()]);
        }
        args.push(name);
        let stderr = s.docker_fails(&args).map_err(|e| format!("{what}: {e}"))?;
        let lower = stderr.to_lowercase();
        for k in keywords {
            ensure!(
                lower.contains(&k.to_lowercase()),
                "{what}: the error does not mention {k:?}: {}",
                stderr.trim()
            );
        }
        println!("    {what}: {}", stderr.trim());
        let after = s.root_entries()?;
        ensure!(
            after == before,
            "{what}: the plugin root changed from {before:?} to {after:?}"
        );
        ensure!(
            entries(&s.root.join(".trash"))?.is_empty() || { s.trash_is_empty_soon().is_ok() },
            "{what}: something was left in .trash"
        );
        let listed = s.docker_ok(&["volume", "ls", "-q"])?;
        ensure!(
            !listed.lines().any(|l| l == name),
            "{what}: docker volume ls lists {name}"
        );
    }
    // Creating an existing name with other options never reaches the plugin: dockerd asks Get,
    // finds the volume and answers success without a Create. The volume must stay as it was.
    let base_opt = format!("base={good}");
    s.docker_ok(&[
        "volume",
        "create",
        "--driver",
        DRIVER,
        "--opt",
        &base_opt,
        "--opt",
        "volatile=true",
        &existing,
    ])?;
    let st = s.inspect(&existing)?;
    ensure!(
        st["Status"]["Volatile"] == false,
        "re-creating {existing} with volatile=true changed it: {}",
        st["Status"]
    );
    ensure!(
        snapshot(&s.vol_dir(&existing))? == existing_before,
        "re-creating {existing} with other options changed its directory"
    );
    ensure!(
        !Path::new(&missing).exists() && !s.bases.join("relative").exists(),
        "a refused create made a base directory"
    );
    Ok(())
}

/// 12. `docker volume rm` while in use is refused; afterwards everything of the volume is gone.
fn remove_in_use(s: &mut Suite) -> Res {
    let base = s.base("rm", &[("base.txt", "base\n")])?;
    let before = snapshot(&base)?;
    let vol = s.volume("rm", &base, false)?;
    let a = s.start_container("rm", &[mount(&vol, "/x")])?;
    s.exec(&a, "echo data > /x/data.txt")?;
    let err = s.docker_fails(&["volume", "rm", &vol])?;
    ensure!(
        err.contains("in use"),
        "removing a volume in use: unclear error: {}",
        err.trim()
    );
    ensure!(
        s.vol_dir(&vol).is_dir(),
        "the refused remove deleted the volume"
    );
    s.expect_mounted(&vol, true, "after a refused remove")?;
    let out = s.exec(&a, "cat /x/data.txt /x/base.txt")?;
    ensure!(out == "data\nbase\n", "after a refused remove: {out:?}");
    s.stop(&a)?;
    let err = s.docker_fails(&["volume", "rm", &vol])?;
    ensure!(
        err.contains("in use"),
        "removing a volume of a stopped container: unclear error: {}",
        err.trim()
    );
    ensure!(
        s.vol_dir(&vol).is_dir(),
        "the refused remove deleted the volume"
    );
    s.remove(&a)?;
    s.docker_ok(&["volume", "rm", &vol])?;
    ensure!(
        !s.vol_dir(&vol).exists(),
        "{} still exists after docker volume rm",
        s.vol_dir(&vol).display()
    );
    ensure!(!s.mounted(&vol)?, "still mounted after docker volume rm");
    s.trash_is_empty_soon()?;
    let listed = s.docker_ok(&["volume", "ls", "-q"])?;
    ensure!(
        !listed.lines().any(|l| l == vol),
        "docker volume ls still lists {vol}"
    );
    let leftovers: Vec<String> = s
        .root_entries()?
        .into_iter()
        .filter(|e| e.contains(&vol))
        .collect();
    ensure!(
        leftovers.is_empty(),
        "left in the plugin root: {leftovers:?}"
    );
    ensure!(snapshot(&base)? == before, "the base changed");
    let err = s.docker_fails(&["volume", "inspect", &vol])?;
    ensure!(
        err.to_lowercase().contains("no such volume"),
        "inspect after remove: {}",
        err.trim()
    );
    Ok(())
}

/// The processes of the test namespace, grouped by command, for the report: what a `kill -9`
/// of dockerd leaves running.
fn describe_survivors(s: &Suite, container_pid: u32) -> String {
    let mut by_comm: BTreeMap<String, usize> = BTreeMap::new();
    for (_, c) in s.ns_processes() {
        *by_comm.entry(c).or_default() += 1;
    }
    let shown: Vec<String> = by_comm
        .iter()
        .filter(|(c, _)| c.starts_with("containerd") || c.starts_with("dockerd"))
        .map(|(c, n)| format!("{c} x{n}"))
        .collect();
    format!(
        "container process {}; in the namespace: {}",
        if alive(container_pid) {
            "alive"
        } else {
            "gone"
        },
        if shown.is_empty() {
            "no dockerd/containerd process".to_owned()
        } else {
            shown.join(", ")
        }
    )
}

/// 13. dockerd is killed (`kill -9`) and restarted without live-restore while a container uses
///     a volatile volume. What really happens: dockerd's containerd dies with it, the shim and
///     the container live on until the restarted dockerd's restore kills the container; no
///     Unmount is ever sent for its mount (dockerd's counts were in memory), so the plugin is
///     left with a record of a dead client. Required: the next container does not see the
///     dead one's scratch file, the volume unmounts after it, and the old container, started
///     again with its saved mount ID, works and is counted right.
fn dockerd_restart(s: &mut Suite) -> Res {
    let base = s.base("dockerd-restart", &[("base.txt", "base\n")])?;
    let before = snapshot(&base)?;
    let vol = s.volume("restart", &base, true)?;
    let a = s.start_container("restart-a", &[mount(&vol, "/x")])?;
    s.exec(&a, "echo scratch > /x/scratch.txt")?;
    let records = s.records(&vol)?;
    ensure!(
        records.len() == 1 && records.values().all(|&n| n == 1),
        "one mount record with one use expected while the container runs: {records:?}"
    );
    let saved_id = records.keys().next().cloned().unwrap_or_default();
    let a_pid = s.container_pid(&a)?;

    s.kill9_dockerd()?;
    println!(
        "    after kill -9 of dockerd: {}",
        describe_survivors(s, a_pid)
    );
    s.expect_mounted(&vol, true, "right after dockerd was killed")?;
    s.start_dockerd()?;
    let killed = wait_until(Duration::from_secs(60), || !alive(a_pid));
    ensure!(
        killed,
        "without live-restore, the restarted dockerd should stop the old container (pid {a_pid})"
    );
    let running = s.docker_ok(&["inspect", "-f", "{{.State.Running}}", &a])?;
    ensure!(
        running.trim() == "false",
        "the old container is reported running={running:?}"
    );
    println!(
        "    after the restart: {}; plugin records {:?}",
        describe_survivors(s, a_pid),
        s.records(&vol)?
    );
    // The restarted dockerd never sends Unmount for the old mount: its record stays, from a
    // client (the old dockerd) that is gone.
    ensure!(
        s.records(&vol)? == BTreeMap::from([(saved_id.clone(), 1)]),
        "expected the old container's record to be left (dockerd never sends its Unmount): {:?}",
        s.records(&vol)?
    );

    after_dead_clients_mount(s, &vol, &saved_id, &a)?;
    ensure!(snapshot(&base)? == before, "the host's base changed");
    Ok(())
}

/// What follows a dockerd restart that left a record of its dead self (`saved_id`, the mount
/// of container `old`, now stopped): the next container does not see the old one's scratch
/// file and unmounts the volume when it exits, the record is released (and logged); `old`
/// started again holds its saved mount ID once, sees a fresh volatile volume, and its change
/// stays in the upper after it stops. `old` is removed at the end.
fn after_dead_clients_mount(s: &mut Suite, vol: &str, saved_id: &str, old: &str) -> Res {
    let out = s.run(
        &[],
        &[mount(vol, "/x")],
        "ls /x && cat /x/base.txt && echo new > /x/new.txt",
    )?;
    ensure!(
        out == "base.txt\nbase\n",
        "the next container saw {out:?}: the base, without the dead container's scratch file"
    );
    s.expect_mounted(vol, false, "after the next container exited")?;
    ensure!(
        s.records(vol)?.is_empty(),
        "mount records left after the next container exited: {:?}",
        s.records(vol)?
    );
    let log = read(&s.plugin_log)?;
    ensure!(
        log.contains(&format!("released mount ID {saved_id}")),
        "the plugin did not log the release of the dead dockerd's mount {saved_id}"
    );

    s.docker_ok(&["start", old])?;
    ensure!(
        s.records(vol)? == BTreeMap::from([(saved_id.to_owned(), 1)]),
        "the old container started again should hold its saved mount ID {saved_id} once: {:?}",
        s.records(vol)?
    );
    let out = s.exec(old, "ls /x && echo again > /x/again.txt")?;
    ensure!(
        out == "base.txt\n",
        "the old container started again saw {out:?} instead of a fresh volatile volume"
    );
    s.stop(old)?;
    s.expect_mounted(vol, false, "after the old container stopped again")?;
    ensure!(
        s.records(vol)?.is_empty(),
        "mount records left after the old container stopped: {:?}",
        s.records(vol)?
    );
    s.expect_file(&s.upper(vol).join("again.txt"), "again\n")?;
    s.remove(old)
}

/// 14. The same with `--live-restore`. (a) A container keeps running across a `kill -9` and
///     restart of dockerd and keeps its volume mounted with its data; a container started
///     meanwhile shares the live changes; after both stopped the volume is unmounted and the
///     next container gets a fresh volatile volume. dockerd 20.10 restores the mount count of
///     a container that ran across its restart and sends its Unmount; a dockerd that does not
///     leaves the dead dockerd's record, which the next Mount releases (nothing holds the
///     overlay any more) — both are accepted, and the report says which happened. (b) A
///     container that stops while dockerd is down: the restarted dockerd never sends its
///     Unmount, the overlay stays mounted on the dead dockerd's record until the next Mount,
///     which releases it and discards the volatile changes; that container's exit unmounts
///     the volume; the old container started again with its saved mount ID is counted right.
fn dockerd_restart_live_restore(s: &mut Suite) -> Res {
    s.remove_all_containers()?;
    s.stop_dockerd()?;
    s.start_dockerd_with(&["--live-restore"])?;
    let result = live_restore_running(s).and_then(|()| live_restore_stopped_while_down(s));
    // Back to the suite's dockerd, without live-restore, whatever happened.
    let back = s
        .remove_all_containers()
        .and_then(|()| s.stop_dockerd())
        .and_then(|()| s.start_dockerd());
    result.and(back)
}

/// 14 (a): a container runs across the restart.
fn live_restore_running(s: &mut Suite) -> Res {
    let base = s.base("live-restore", &[("base.txt", "base\n")])?;
    let before = snapshot(&base)?;
    let vol = s.volume("live-restore", &base, true)?;
    let a = s.start_container("lr-a", &[mount(&vol, "/x")])?;
    s.exec(&a, "echo from-a > /x/a.txt")?;
    let records = s.records(&vol)?;
    ensure!(records.len() == 1, "one mount record expected: {records:?}");
    let a_id = records.keys().next().cloned().unwrap_or_default();
    let a_pid = s.container_pid(&a)?;

    s.kill9_dockerd()?;
    println!(
        "    after kill -9 of dockerd (live-restore): {}",
        describe_survivors(s, a_pid)
    );
    s.start_dockerd_with(&["--live-restore"])?;
    ensure!(
        alive(a_pid),
        "with live-restore the container (pid {a_pid}) should survive the dockerd restart"
    );
    let out = s.exec(&a, "cat /x/a.txt /x/base.txt && echo after > /x/after.txt")?;
    ensure!(
        out == "from-a\nbase\n",
        "after the dockerd restart the running container saw {out:?}"
    );
    s.expect_mounted(&vol, true, "while the live-restored container runs")?;

    let b = s.start_container("lr-b", &[mount(&vol, "/x")])?;
    let out = s.exec(&b, "cat /x/a.txt /x/after.txt && echo from-b > /x/b.txt")?;
    ensure!(
        out == "from-a\nafter\n",
        "a container started after the restart saw {out:?} instead of the live changes"
    );
    let out = s.exec(&a, "cat /x/b.txt")?;
    ensure!(
        out == "from-b\n",
        "the live-restored container saw {out:?} instead of the new one's file"
    );
    let records = s.records(&vol)?;
    ensure!(
        records.len() == 2 && records.get(&a_id) == Some(&1),
        "the live-restored container's mount (asked for by the dead dockerd) must be kept while it runs: {records:?}"
    );
    s.stop(&b)?;
    s.remove(&b)?;
    s.expect_mounted(&vol, true, "while the live-restored container still runs")?;
    let out = s.exec(&a, "cat /x/a.txt /x/b.txt")?;
    ensure!(
        out == "from-a\nfrom-b\n",
        "the live-restored container lost the volume when the other stopped: {out:?}"
    );
    ensure!(
        s.records(&vol)? == BTreeMap::from([(a_id.clone(), 1)]),
        "after the new container stopped: {:?}",
        s.records(&vol)?
    );

    s.stop(&a)?;
    s.remove(&a)?;
    let unmount_sent = wait_until(Duration::from_secs(5), || {
        s.records(&vol).is_ok_and(|r| r.is_empty()) && s.mounted(&vol).is_ok_and(|m| !m)
    });
    if unmount_sent {
        println!(
            "    the restarted dockerd sent the live-restored container's Unmount: the volume unmounted when it stopped"
        );
    } else {
        ensure!(
            s.records(&vol)? == BTreeMap::from([(a_id.clone(), 1)]) && s.mounted(&vol)?,
            "after both containers stopped: mounted {}, records {:?}",
            s.mounted(&vol)?,
            s.records(&vol)?
        );
        println!(
            "    the restarted dockerd did not send the live-restored container's Unmount: the next Mount releases it"
        );
    }

    let out = s.run(&[], &[mount(&vol, "/x")], "ls /x")?;
    ensure!(
        out == "base.txt\n",
        "the next container saw {out:?}: the changes of the stopped containers must be discarded"
    );
    s.expect_mounted(&vol, false, "after the next container exited")?;
    ensure!(
        s.records(&vol)?.is_empty(),
        "mount records left: {:?}",
        s.records(&vol)?
    );
    if !unmount_sent {
        let log = read(&s.plugin_log)?;
        ensure!(
            log.contains(&format!("released mount ID {a_id}")),
            "the plugin did not log the release of the dead dockerd's mount {a_id}"
        );
    }
    ensure!(snapshot(&base)? == before, "the host's base changed");
    Ok(())
}

/// 14 (b): a container stops while dockerd is down.
fn live_restore_stopped_while_down(s: &mut Suite) -> Res {
    let base = s.base("live-restore-down", &[("base.txt", "base\n")])?;
    let before = snapshot(&base)?;
    let vol = s.volume("lr-down", &base, true)?;
    let c = s.start_container("lr-c", &[mount(&vol, "/x")])?;
    s.exec(&c, "echo scratch > /x/scratch.txt")?;
    let records = s.records(&vol)?;
    ensure!(records.len() == 1, "one mount record expected: {records:?}");
    let c_id = records.keys().next().cloned().unwrap_or_default();
    let c_pid = s.container_pid(&c)?;

    s.kill9_dockerd()?;
    // The container's first process dies; the rest of its pid namespace dies with it.
    ensure!(
        kill(c_pid, Signal::KILL),
        "cannot kill the container (pid {c_pid})"
    );
    ensure!(
        wait_until(Duration::from_secs(20), || !alive(c_pid)),
        "the container (pid {c_pid}) did not die"
    );
    s.start_dockerd_with(&["--live-restore"])?;
    let stopped = wait_until(Duration::from_secs(30), || {
        s.docker_ok(&["inspect", "-f", "{{.State.Running}}", &c])
            .is_ok_and(|r| r.trim() == "false")
    });
    ensure!(
        stopped,
        "the restarted dockerd still reports the dead container running"
    );
    println!(
        "    container stopped while dockerd was down: mounted {}, records {:?}",
        s.mounted(&vol)?,
        s.records(&vol)?
    );
    ensure!(
        s.records(&vol)? == BTreeMap::from([(c_id.clone(), 1)]) && s.mounted(&vol)?,
        "expected the dead dockerd's record to be left (dockerd never sends the Unmount of a container that stopped while it was down): mounted {}, records {:?}",
        s.mounted(&vol)?,
        s.records(&vol)?
    );

    after_dead_clients_mount(s, &vol, &c_id, &c)?;
    ensure!(snapshot(&base)? == before, "the host's base changed");
    Ok(())
}

// ----- Benchmark --------------------------------------------------------------------------------

struct Bench {
    runs: usize,
    rows: Vec<(String, Vec<Duration>)>,
}

/// [`BENCH_RUNS`], or `DOT_BENCH_RUNS` if set (at least 1).
fn bench_runs() -> Res<usize> {
    match std::env::var("DOT_BENCH_RUNS") {
        Err(_) => Ok(BENCH_RUNS),
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "DOT_BENCH_RUNS={v:?}: a number of runs per kind (1 or more) expected"
            )),
        },
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// The `q` quantile of `v` (nearest rank): 0.25 and 0.75 bound the interquartile range.
fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// The run-to-run spread of `times`: interquartile range and min–max.
fn spread(times: &[Duration]) -> (Duration, Duration, Duration, Duration) {
    (
        quantile(times, 0.25),
        quantile(times, 0.75),
        *times.iter().min().unwrap(),
        *times.iter().max().unwrap(),
    )
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Median of `docker run --rm --network none -v VOL:/x IMAGE true` for a docker-on-top
/// volume, a bind mount and the `local` driver with `type=overlay`, interleaved.
fn benchmark(s: &mut Suite) -> Res<Bench> {
    let runs = bench_runs()?;
    let base = s.base("bench", &[("f", "f\n")])?;
    let dot = s.volume("bench", &base, false)?;
    let bind = s.base("bench-bind", &[("f", "f\n")])?;
    let lower = s.base("bench-overlay/lower", &[("f", "f\n")])?;
    let upper = s.base("bench-overlay/upper", &[])?;
    let work = s.base("bench-overlay/work", &[])?;
    let local = s.unique("bench-local");
    s.docker_ok(&[
        "volume",
        "create",
        "--driver",
        "local",
        "--opt",
        "type=overlay",
        "--opt",
        "device=overlay",
        "--opt",
        &format!(
            "o=lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        ),
        &local,
    ])?;
    let kinds = [
        ("docker-on-top volume", format!("{dot}:/x")),
        ("bind mount", format!("{}:/x", bind.display())),
        ("local driver, type=overlay", format!("{local}:/x")),
    ];
    let mut rows: Vec<(String, Vec<Duration>)> = kinds
        .iter()
        .map(|(k, _)| (k.to_string(), Vec::new()))
        .collect();
    for round in 0..runs + 1 {
        for (i, (kind, spec)) in kinds.iter().enumerate() {
            let mut cmd = s.docker_cmd();
            cmd.args([
                "run",
                "--rm",
                "--network",
                "none",
                "-v",
                spec,
                IMAGE,
                "true",
            ]);
            let t = Instant::now();
            let out = run_cmd(&mut cmd, CMD_TIMEOUT)?;
            let took = t.elapsed();
            ensure!(
                out.success(),
                "{kind}: docker run failed: {}",
                out.stderr.trim()
            );
            if round > 0 {
                // Round 0 warms up.
                rows[i].1.push(took);
            }
        }
    }
    s.expect_mounted(&dot, false, "after the benchmark")?;
    Ok(Bench { runs, rows })
}

fn machine_description(s: &Suite) -> String {
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    let version = s
        .docker_ok(&[
            "version",
            "--format",
            "Docker Engine {{.Server.Version}}, CLI {{.Client.Version}}",
        ])
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    let storage = s
        .docker_ok(&[
            "info",
            "--format",
            "{{.Driver}}, cgroup v{{.CgroupVersion}}",
        ])
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    let load = fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!(
        "nproc {cpus} ({model}), Linux {kernel}, {version}, storage driver {storage}; load average {load} when measured"
    )
}

fn write_benchmarks(bench: &Bench, machine: &str) -> Res {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut section = String::new();
    let _ = writeln!(section, "{BENCH_HEADING}\n");
    let _ = writeln!(
        section,
        "Median wall time of `docker run --rm --network none -v VOL:/x IMAGE true` over {} runs \
         per kind (after one warm-up run; the kinds interleaved), against the suite's private dockerd \
         and the busybox test image. Measured by `tests/docker.rs` in one run of \
         `DOT_WRITE_BENCHMARKS=1 cargo test --test docker -- benchmark` (the plugin is a debug \
         build). Each row's run-to-run spread, which the machine's load adds to, is given as the \
         interquartile range (p25–p75, nearest rank) and min–max.\n",
        bench.runs
    );
    let _ = writeln!(section, "| volume | median | p25–p75 | min | max |");
    let _ = writeln!(section, "|---|---|---|---|---|");
    for (kind, times) in &bench.rows {
        let spec = match kind.as_str() {
            "docker-on-top volume" => "docker-on-top volume (`-v VOL:/x`)".to_owned(),
            "bind mount" => "plain bind mount (`-v /host/dir:/x`)".to_owned(),
            _ => "`local` driver, `-o type=overlay -o device=overlay -o o=lowerdir=…,upperdir=…,workdir=…`"
                .to_owned(),
        };
        let (p25, p75, min, max) = spread(times);
        let _ = writeln!(
            section,
            "| {spec} | {} | {}–{} | {} | {} |",
            ms(median(times)),
            ms(p25),
            ms(p75),
            ms(min),
            ms(max)
        );
    }
    let _ = writeln!(section, "\nMachine: {machine}. Date: {}.", &date[..10]);
    let old = fs::read_to_string(&path).unwrap_or_default();
    let new = if old.is_empty() {
        format!("# Benchmarks\n\n{section}")
    } else if let Some(start) = old.find(&format!("{BENCH_HEADING}\n")) {
        let rest = &old[start + BENCH_HEADING.len()..];
        let end = rest
            .find("\n## ")
            .map_or(old.len(), |i| start + BENCH_HEADING.len() + i + 1);
        format!("{}{section}{}", &old[..start], {
            let tail = &old[end..];
            if tail.is_empty() {
                String::new()
            } else {
                format!("\n{tail}")
            }
        })
    } else {
        format!(
            "{}\n{section}",
            old.trim_end_matches('\n').to_owned() + "\n"
        )
    };
    fs::write(&path, new).ctx(format!("writing {}", path.display()))
}

// ----- Main -------------------------------------------------------------------------------------

type Scenario = fn(&mut Suite) -> Res;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("01 basic copy-on-write", basic),
    ("02 volatile", volatile),
    ("03 two containers share live", live_sharing),
    ("04 docker cp while running", docker_cp),
    ("05 --user 1000 at the volume root", non_root_user),
    ("06 bases with spaces, commas, colons", special_paths),
    ("07 docker volume inspect", inspect),
    ("08 image content at the mount target", image_content),
    ("09 plugin killed while a container runs", plugin_killed),
    ("10 socket activation", socket_activation),
    ("11 bad input through the docker CLI", bad_input),
    ("12 docker volume rm while in use", remove_in_use),
    ("13 dockerd killed and restarted", dockerd_restart),
    (
        "14 dockerd killed and restarted with live-restore",
        dockerd_restart_live_restore,
    ),
    ("15 sized volume: the cap holds", sized),
];

const BENCH_NAME: &str = "benchmark: docker run with a volume";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        // For test runners that ask (libtest's format).
        println!("docker_end_to_end: test");
        return ExitCode::SUCCESS;
    }
    // libtest-style arguments: NAME filters, `--skip NAME`; other flags are ignored.
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--skip" => skips.extend(args.next()),
            "--test-threads" | "--format" | "--color" | "--logfile" | "-Z" | "--shuffle-seed" => {
                args.next();
            }
            "docker_end_to_end" => {}
            a if a.starts_with('-') => {}
            _ => filters.push(arg),
        }
    }
    let selected = |name: &str| {
        (filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
            && !skips.iter().any(|s| name.contains(s.as_str()))
    };
    let mut checks: Vec<&str> = SCENARIOS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| selected(n))
        .collect();
    if selected(BENCH_NAME) {
        checks.push(BENCH_NAME);
    }
    if checks.is_empty() {
        println!("docker e2e: no scenario matches {filters:?}\n0 passed, 0 failed");
        return ExitCode::SUCCESS;
    }

    let t0 = Instant::now();
    let resources = Arc::new(Mutex::new(Resources::default()));
    install_signal_teardown(resources.clone());
    let mut results: Vec<(String, Res, Duration)> = Vec::new();
    let mut bench_text = None;
    let mut teardown_warnings = Vec::new();
    let mut logs = None;

    let mut suite = match Suite::new(resources.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            for c in &checks {
                results.push((
                    c.to_string(),
                    Err(format!("setup failed: {e}")),
                    Duration::ZERO,
                ));
            }
            None
        }
    };
    if let Some(s) = suite.as_mut() {
        println!("docker e2e: setting up in {}", s.tmp.display());
        let setup = catch_unwind(AssertUnwindSafe(|| s.start()))
            .unwrap_or_else(|p| Err(format!("setup panicked: {}", panic_message(&p))));
        match setup {
            Err(e) => {
                println!("docker e2e: SETUP FAILED: {e}");
                for c in &checks {
                    results.push((
                        c.to_string(),
                        Err(format!("could not run: setup failed: {e}")),
                        Duration::ZERO,
                    ));
                }
            }
            Ok(()) => {
                println!("docker e2e: dockerd and plugin up in {:.1?}", t0.elapsed());
                for (name, scenario) in SCENARIOS.iter().filter(|(n, _)| checks.contains(n)) {
                    let t = Instant::now();
                    let mut result = catch_unwind(AssertUnwindSafe(|| scenario(s)))
                        .unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(&p))));
                    // No scenario may leave containers or a dead plugin behind.
                    let _ = s.remove_all_containers();
                    if let Err(e) = s.plugin_alive() {
                        if result.is_ok() {
                            result = Err(e);
                        }
                        let _ = s.start_plugin(&[]);
                    }
                    report_line(name, &result, t.elapsed());
                    results.push((name.to_string(), result, t.elapsed()));
                }
                if checks.contains(&BENCH_NAME) {
                    let t = Instant::now();
                    let result = catch_unwind(AssertUnwindSafe(|| benchmark(s)))
                        .unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(&p))));
                    let result = result.and_then(|bench| {
                        let machine = machine_description(s);
                        let mut text = format!(
                            "median of {} runs of `docker run --rm --network none -v VOL:/x {IMAGE} true`, \
                             with the run-to-run spread (interquartile range p25–p75, min–max):\n",
                            bench.runs
                        );
                        for (kind, times) in &bench.rows {
                            let (p25, p75, min, max) = spread(times);
                            let _ = writeln!(
                                text,
                                "  {kind:<28} {:>9}  (p25–p75 {}–{}, IQR {}; min–max {}–{})",
                                ms(median(times)),
                                ms(p25),
                                ms(p75),
                                ms(p75 - p25),
                                ms(min),
                                ms(max)
                            );
                        }
                        let _ = writeln!(text, "  machine: {machine}");
                        if std::env::var("DOT_WRITE_BENCHMARKS").is_ok_and(|v| v == "1") {
                            write_benchmarks(&bench, &machine)?;
                            let _ = writeln!(text, "  written to BENCHMARKS.md");
                        }
                        bench_text = Some(text);
                        Ok(())
                    });
                    report_line(BENCH_NAME, &result, t.elapsed());
                    results.push((BENCH_NAME.to_string(), result, t.elapsed()));
                }
            }
        }
        logs = Some(save_logs(s));
        teardown_warnings = s.teardown();
    }
    drop(suite);

    let failed = results.iter().filter(|r| r.1.is_err()).count();
    let passed = results.len() - failed;
    println!(
        "\n===== docker end-to-end report ({:.1?}) =====",
        t0.elapsed()
    );
    for (name, result, took) in &results {
        match result {
            Ok(()) => println!("PASS  {name} ({took:.1?})"),
            Err(e) => println!("FAIL  {name} ({took:.1?}): {e}"),
        }
    }
    if let Some(text) = &bench_text {
        println!("\n{text}");
    }
    for w in &teardown_warnings {
        println!("teardown warning: {w}");
    }
    if failed > 0
        && let Some((plugin, dockerd, saved)) = &logs
    {
        println!("\n----- last 40 lines of the plugin's log -----\n{plugin}");
        println!("\n----- last 40 lines of dockerd's log -----\n{dockerd}");
        println!("\n(full logs: {saved})");
    }
    println!("\n{passed} passed, {failed} failed");
    if failed > 0 || !teardown_warnings.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn report_line(name: &str, result: &Res, took: Duration) {
    match result {
        Ok(()) => println!("PASS  {name} ({took:.1?})"),
        Err(e) => println!("FAIL  {name} ({took:.1?}): {e}"),
    }
    let _ = io::stdout().flush();
}

/// Log tails, and a copy of the whole logs under target/tmp (the temp dir goes away).
fn save_logs(s: &Suite) -> (String, String, String) {
    let dest = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker-e2e");
    let _ = fs::create_dir_all(&dest);
    let _ = fs::copy(&s.plugin_log, dest.join("plugin.log"));
    let _ = fs::copy(&s.dockerd_log, dest.join("dockerd.log"));
    (
        tail(&s.plugin_log, 40),
        tail(&s.dockerd_log, 40),
        dest.display().to_string(),
    )
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}
