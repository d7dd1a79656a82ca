//! Compose and Swarm with the plugin (issue 15): Debian's `docker-compose` and a single-node
//! swarm drive a private dockerd, which talks to the real plugin binary on its socket.
//!
//! Isolation (see `tests/common/host.rs`): dockerd and the plugin run in a private mount
//! namespace (private tmpfs on `/run/docker/plugins`, `/etc/docker` and `/run/containerd`) and
//! a private network namespace with only `lo`: `swarm init` makes a `docker_gwbridge` bridge,
//! veths and an ingress namespace and listens on 127.0.0.1:2377, and all of that stays there.
//! dockerd has its own data root, exec root, socket and cgroup parent, the plugin its own
//! `--root`; compose and the docker CLI reach dockerd through its unix socket
//! (`DOCKER_HOST=unix://...`). The teardown leaves the swarm, stops dockerd (SIGTERM) and then
//! the plugin, and kills whatever is left with the namespaces.
//!
//! Compose: a top-level volume with `driver: docker-on-top` and `driver_opts` (`base`,
//! `volatile: "true"`) shared by two services; `up -d`, a file written by one service is seen
//! live by the other, the base stays as it was, the change is in the volume's `upper/`;
//! `stop` + `start` discards it (volatile); `down -v` removes the volume.
//! Swarm: `docker service create --mount type=volume,...,volume-driver=docker-on-top,
//! volume-opt=base=DIR`; the task reads the base and writes to the upper; `service rm`
//! unmounts; `swarm leave --force`.
//!
//! A step that cannot run (no root, no compose, a swarm that does not start) fails; nothing is
//! skipped. Logs are copied to `target/tmp/compose-swarm/`.

mod common;
#[path = "common/host.rs"]
mod host;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use serde_json::{Value, json};

use host::{
    Context, Dockerd, PLUGIN_SOCKET, Report, Res, Sandbox, ensure, find_busybox, in_path, run_cmd,
    stdout_suffix, tail, wait_until,
};

const BIN: &str = env!("CARGO_BIN_EXE_docker-on-top");
const IMAGE: &str = "dot-compose-swarm:latest";
const DRIVER: &str = "docker-on-top";
const TIMEOUT: Duration = Duration::from_secs(120);
/// A container command that runs until it is stopped, and then exits at once.
const LONG_RUNNING: &str = "trap 'exit 0' TERM INT; while :; do sleep 1 & wait $!; done";
const PROJECT: &str = "dotcompose";
/// The compose file's volume `shared`, as compose names it.
const COMPOSE_VOLUME: &str = "dotcompose_shared";
const SERVICE: &str = "dot-swarm";
const SWARM_VOLUME: &str = "dot-swarm-data";
/// Listening on loopback only, in the private network namespace.
const SWARM_ADDR: &str = "127.0.0.1";

struct Env {
    sandbox: Sandbox,
    docker: Dockerd,
    /// The plugin's `--root`.
    root: PathBuf,
    bases: PathBuf,
    plugin_log: PathBuf,
    plugin_pid: u32,
    /// `docker-compose`, or `docker compose` (the v2 plugin).
    compose: Vec<String>,
    compose_file: PathBuf,
    swarm: bool,
}

impl Env {
    fn docker(&self, args: &[&str]) -> Res<String> {
        self.docker.ok(args, TIMEOUT)
    }

    /// `docker-compose -f FILE -p PROJECT ARGS` against the private dockerd; must succeed.
    fn compose(&self, args: &[&str]) -> Res<String> {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .arg("-f")
            .arg(&self.compose_file)
            .args(["-p", PROJECT])
            .args(args)
            .current_dir(self.compose_file.parent().unwrap_or(Path::new("/")));
        compose_env(&mut cmd, &self.docker);
        let out = run_cmd(&mut cmd, TIMEOUT)?;
        ensure!(
            out.success(),
            "`{} {}` failed ({:?}): {}{}",
            self.compose.join(" "),
            args.join(" "),
            out.code,
            out.stderr.trim(),
            stdout_suffix(&out.stdout)
        );
        Ok(out.stdout)
    }

    /// `compose exec -T SERVICE sh -c SCRIPT`.
    fn compose_exec(&self, service: &str, script: &str) -> Res<String> {
        self.compose(&["exec", "-T", service, "sh", "-c", script])
    }

    /// A fresh base directory holding `files`.
    fn base(&self, name: &str, files: &[(&str, &str)]) -> Res<PathBuf> {
        host::make_tree(&self.bases.join(name), files)
    }

    fn upper(&self, volume: &str) -> PathBuf {
        self.root.join(volume).join("upper")
    }

    /// The plugin's answer to `Get`, as dockerd asks it: the `Volume` object, or the error.
    fn get(&self, volume: &str) -> Res<Value> {
        let socket = self.sandbox.ns_path(PLUGIN_SOCKET);
        let reply = common::daemon::call(
            &socket,
            "/VolumeDriver.Get",
            Some(&json!({ "Name": volume })),
        )?;
        Ok(reply["Volume"].clone())
    }

    /// Whether an overlay is mounted on the volume's mountpoint in the namespace.
    fn mounted(&self, volume: &str) -> Res<bool> {
        let target = self.root.join(volume).join("mountpoint");
        let info = fs::read(format!("/proc/{}/mountinfo", self.sandbox.anchor_pid))
            .ctx("reading the namespace's mountinfo")?;
        Ok(common::daemon::parse_mountinfo(&info)
            .iter()
            .any(|m| m.mount_point == target && m.fstype == "overlay"))
    }

    /// The overlays mounted under the plugin's root.
    fn overlays(&self) -> Res<Vec<PathBuf>> {
        let info = fs::read(format!("/proc/{}/mountinfo", self.sandbox.anchor_pid))
            .ctx("reading the namespace's mountinfo")?;
        Ok(common::daemon::parse_mountinfo(&info)
            .into_iter()
            .filter(|m| m.fstype == "overlay" && m.mount_point.starts_with(&self.root))
            .map(|m| m.mount_point)
            .collect())
    }

    /// The volume's mount IDs (one record file each).
    fn records(&self, volume: &str) -> Res<Vec<String>> {
        Ok(host::mount_records(&self.root.join(volume))?
            .into_keys()
            .collect())
    }

    /// Waits (dockerd's Unmount may trail the CLI's return) until the volume is
    /// mounted (`want`) or not, with as many records as containers use it.
    fn expect_mounted(&self, volume: &str, want: bool, records: usize, when: &str) -> Res {
        let ok = wait_until(Duration::from_secs(15), || {
            self.mounted(volume).is_ok_and(|m| m == want)
                && self.records(volume).is_ok_and(|r| r.len() == records)
        });
        ensure!(
            ok,
            "{when}: volume {volume} should {}be mounted with {records} mount record(s); mounted: {:?}, records: {:?}",
            if want { "" } else { "not " },
            self.mounted(volume),
            self.records(volume)
        );
        Ok(())
    }

    /// What a directory holds: relative path → content (`dir` for directories).
    fn snapshot(&self, dir: &Path) -> Res<BTreeMap<String, String>> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> Res {
            for entry in fs::read_dir(dir).ctx(format!("reading {}", dir.display()))? {
                let path = entry.ctx("reading a directory entry")?.path();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                if path.is_dir() {
                    out.insert(rel, "dir".into());
                    walk(root, &path, out)?;
                } else {
                    let content = fs::read(&path).ctx(format!("reading {}", path.display()))?;
                    out.insert(rel, String::from_utf8_lossy(&content).into_owned());
                }
            }
            Ok(())
        }
        let mut out = BTreeMap::new();
        walk(dir, dir, &mut out)?;
        Ok(out)
    }

    /// The swarm task's container of [`SERVICE`] (there is one).
    fn task_container(&self) -> Res<String> {
        let filter = format!("label=com.docker.swarm.service.name={SERVICE}");
        let ids = self.docker(&["ps", "-q", "--filter", &filter])?;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        ensure!(
            ids.len() == 1,
            "expected one running task container of {SERVICE}, found {ids:?}"
        );
        Ok(ids[0].to_owned())
    }

    fn plugin_alive(&mut self) -> Res {
        if let Some(status) = self.sandbox.exited(self.plugin_pid) {
            return Err(format!(
                "the plugin exited ({status}): {}",
                tail(&self.plugin_log, 20)
            ));
        }
        Ok(())
    }

    /// Leaves the swarm, removes the containers, stops dockerd and then the plugin (which
    /// answers dockerd's last calls), and destroys the sandbox. Returns warnings.
    fn teardown(mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Err(e) = self.plugin_alive() {
            warnings.push(e);
        }
        if self.swarm
            && let Err(e) = self.docker(&["swarm", "leave", "--force"])
        {
            warnings.push(format!("leaving the swarm: {e}"));
        }
        match self.docker(&["ps", "-aq"]) {
            Ok(ids) if !ids.trim().is_empty() => {
                let mut args = vec!["rm", "-f"];
                args.extend(ids.split_whitespace());
                if let Err(e) = self.docker(&args) {
                    warnings.push(format!("removing containers: {e}"));
                }
            }
            Ok(_) => {}
            Err(e) => warnings.push(format!("listing containers: {e}")),
        }
        if let Err(e) = self
            .sandbox
            .terminate(self.docker.pid, Duration::from_secs(30))
        {
            warnings.push(format!("stopping dockerd: {e}"));
        }
        if let Err(e) = self
            .sandbox
            .terminate(self.plugin_pid, Duration::from_secs(15))
        {
            warnings.push(format!("stopping the plugin: {e}"));
        }
        let saved = Path::new(env!("CARGO_TARGET_TMPDIR")).join("compose-swarm");
        let _ = fs::create_dir_all(&saved);
        let _ = fs::copy(&self.plugin_log, saved.join("plugin.log"));
        let _ = fs::copy(&self.docker.log, saved.join("dockerd.log"));
        let tmp = self.sandbox.tmp.clone();
        warnings.extend(self.sandbox.destroy());
        // Nothing of ours may be mounted on the host.
        let host_mounts = fs::read("/proc/self/mountinfo").unwrap_or_default();
        let leaked: Vec<PathBuf> = common::daemon::parse_mountinfo(&host_mounts)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&tmp))
            .collect();
        if !leaked.is_empty() {
            warnings.push(format!("mounts left on the host: {leaked:?}"));
        }
        warnings
    }
}

/// The environment of a compose command: the private dockerd, none of the caller's DOCKER_*
/// or COMPOSE_* settings.
fn compose_env(cmd: &mut Command, docker: &Dockerd) {
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        if name.starts_with("DOCKER_") || name.starts_with("COMPOSE_") {
            cmd.env_remove(&var);
        }
    }
    cmd.env("DOCKER_HOST", format!("unix://{}", docker.sock.display()))
        .env("DOCKER_CONFIG", &docker.config)
        .env("DOCKER_CLI_HINTS", "false");
}

/// `docker-compose` (Debian's package), else the v2 CLI plugin (`docker compose`).
fn find_compose(docker: &Dockerd) -> Res<Vec<String>> {
    if in_path("docker-compose") {
        return Ok(vec!["docker-compose".into()]);
    }
    let mut cmd = docker.cmd();
    cmd.args(["compose", "version"]);
    if run_cmd(&mut cmd, TIMEOUT).is_ok_and(|o| o.success()) {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    Err("neither docker-compose nor `docker compose`: install Debian's docker-compose (scripts/test does)".into())
}

/// Private tmpfs mounts hiding the host's plugin sockets and specs, Docker config and
/// containerd from the private dockerd (as in tests/docker.rs).
const PRIVATE_TMPFS: [&str; 3] = ["/run/docker/plugins", "/etc/docker", "/run/containerd"];

fn setup() -> Res<Env> {
    host::require_programs(&host::DOCKER_PROGRAMS)?;
    host::require_programs(&[("ip", "iproute2")])?;
    let busybox = find_busybox()?;
    let mut sandbox = Sandbox::with_network("compose-swarm", &PRIVATE_TMPFS)?;
    let t = sandbox.tmp.clone();
    let root = t.join("state");
    let plugin_log = t.join("plugin.log");
    let plugin_pid = sandbox.start_plugin(BIN, &root, &[], &plugin_log)?;
    // Swarm pins a service's image to its registry digest and pulls it before each task (an
    // error there is only logged); no registry is reachable, and the image is local. moby's
    // own integration tests set the same.
    let docker = sandbox.start_dockerd_env(&[("DOCKER_SERVICE_PREFER_OFFLINE_IMAGE", "1")])?;
    let compose = find_compose(&docker)?;
    let compose_dir = t.join("compose");
    fs::create_dir_all(&compose_dir).ctx("creating the compose directory")?;
    let env = Env {
        sandbox,
        docker,
        root,
        bases: t.join("bases"),
        plugin_log,
        plugin_pid,
        compose,
        compose_file: compose_dir.join("docker-compose.yml"),
        swarm: false,
    };
    env.docker.import_busybox(&busybox, &t, IMAGE)?;
    Ok(env)
}

/// The environment that setup made.
fn the(env: &Option<Env>) -> Res<&Env> {
    env.as_ref()
        .ok_or_else(|| "no environment: setup failed".to_owned())
}

/// The compose file: two services sharing one docker-on-top volume.
fn compose_file(base: &Path) -> String {
    // `$$` is compose's escape for a literal `$`.
    let command = LONG_RUNNING.replace('$', "$$");
    format!(
        r#"version: "3.8"
services:
  writer:
    image: {IMAGE}
    network_mode: none
    command: ["sh", "-c", "{command}"]
    volumes: ["shared:/data"]
  reader:
    image: {IMAGE}
    network_mode: none
    command: ["sh", "-c", "{command}"]
    volumes: ["shared:/data"]
volumes:
  shared:
    driver: {DRIVER}
    driver_opts:
      base: {base}
      volatile: "true"
"#,
        base = base.display()
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("compose_swarm: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| "compose_swarm".contains(f.as_str())) {
        println!("compose-swarm: not selected\n0 passed, 0 failed");
        return ExitCode::SUCCESS;
    }
    let mut report = Report::new("compose-swarm");
    let mut env: Option<Env> = None;
    report.step(
        "setup: private dockerd (own mount and network namespaces), plugin, busybox image",
        || {
            env = Some(setup()?);
            Ok(())
        },
    );
    let base_files = [("f.txt", "from the base\n"), ("keep.txt", "kept\n")];
    let mut compose_base = PathBuf::new();
    let mut compose_base_before = BTreeMap::new();

    report.step(
        "compose: up -d creates the volume from driver_opts; two services share it live",
        || {
            let e = the(&env)?;
            compose_base = e.base("compose", &base_files)?;
            compose_base_before = e.snapshot(&compose_base)?;
            fs::write(&e.compose_file, compose_file(&compose_base))
                .ctx("writing the compose file")?;
            e.compose(&["up", "-d"])?;
            let running = e.compose(&["ps", "-q"])?;
            ensure!(
                running.split_whitespace().count() == 2,
                "compose ps lists {running:?}, expected two containers"
            );
            let driver = e.docker(&["volume", "inspect", "-f", "{{.Driver}}", COMPOSE_VOLUME])?;
            ensure!(
                driver.trim() == DRIVER,
                "compose made volume {COMPOSE_VOLUME} with driver {driver:?}"
            );
            let vol = e.get(COMPOSE_VOLUME)?;
            ensure!(
                vol["Status"]["Base"] == json!(compose_base.display().to_string())
                    && vol["Status"]["Volatile"] == json!(true),
                "driver_opts did not reach the plugin: Get says {vol}"
            );
            ensure!(
                vol["Mountpoint"].is_string(),
                "Get reports no mountpoint while both services run: {vol}"
            );
            // One overlay; one record per container (dockerd's mount ID for each).
            e.expect_mounted(COMPOSE_VOLUME, true, 2, "with both services up")?;
            let seen = e.compose_exec("writer", "cat /data/f.txt")?;
            ensure!(seen == "from the base\n", "the writer read {seen:?}");
            e.compose_exec(
                "writer",
                "echo live > /data/live.txt && echo changed > /data/f.txt && rm /data/keep.txt",
            )?;
            let seen = e.compose_exec("reader", "cat /data/live.txt /data/f.txt; ls /data")?;
            ensure!(
                seen == "live\nchanged\nf.txt\nlive.txt\n",
                "the reader (running all along) saw {seen:?}"
            );
            Ok(())
        },
    );

    report.step(
        "compose: the base is unchanged; the changes are in the upper under the state root",
        || {
            let e = the(&env)?;
            let now = e.snapshot(&compose_base)?;
            ensure!(
                now == compose_base_before,
                "the base changed: {compose_base_before:?} -> {now:?}"
            );
            let upper = e.upper(COMPOSE_VOLUME);
            for (file, content) in [("live.txt", "live\n"), ("f.txt", "changed\n")] {
                let got = fs::read_to_string(upper.join(file))
                    .ctx(format!("reading {file} in {}", upper.display()))?;
                ensure!(got == content, "upper/{file} holds {got:?}");
            }
            let whiteout = fs::symlink_metadata(upper.join("keep.txt"));
            ensure!(
                whiteout.as_ref().is_ok_and(|m| {
                    use std::os::unix::fs::{FileTypeExt, MetadataExt};
                    m.file_type().is_char_device() && m.rdev() == 0
                }),
                "upper/keep.txt is not a whiteout: {whiteout:?}"
            );
            Ok(())
        },
    );

    report.step(
        "compose: stop unmounts; start mounts again and (volatile) discards the changes",
        || {
            let e = the(&env)?;
            e.compose(&["stop", "-t", "5"])?;
            e.expect_mounted(COMPOSE_VOLUME, false, 0, "after compose stop")?;
            let vol = e.get(COMPOSE_VOLUME)?;
            ensure!(
                vol.get("Mountpoint").is_none() && vol["Status"]["Mounted"] == json!(false),
                "Get after compose stop: {vol}"
            );
            e.compose(&["start"])?;
            e.expect_mounted(COMPOSE_VOLUME, true, 2, "after compose start")?;
            let seen = e.compose_exec("reader", "ls /data; cat /data/f.txt")?;
            ensure!(
                seen == "f.txt\nkeep.txt\nfrom the base\n",
                "after the restart the volatile volume shows {seen:?}"
            );
            Ok(())
        },
    );

    report.step(
        "compose: down -v removes the containers and the volume; the plugin reports it missing",
        || {
            let e = the(&env)?;
            e.compose(&["down", "-v", "-t", "5"])?;
            let left = e.docker(&["ps", "-aq"])?;
            ensure!(left.trim().is_empty(), "containers left: {left:?}");
            let volumes = e.docker(&["volume", "ls", "-q"])?;
            ensure!(
                !volumes.lines().any(|v| v == COMPOSE_VOLUME),
                "dockerd still lists {COMPOSE_VOLUME}: {volumes:?}"
            );
            ensure!(
                !e.root.join(COMPOSE_VOLUME).exists(),
                "{COMPOSE_VOLUME} is still in the plugin's state root"
            );
            match e.get(COMPOSE_VOLUME) {
                Err(msg) => ensure!(
                    msg.contains("does not exist"),
                    "Get after down -v fails, but not as a missing volume: {msg}"
                ),
                Ok(vol) => return Err(format!("the plugin still has the volume: {vol}")),
            }
            let trash = e.root.join(".trash");
            ensure!(
                wait_until(Duration::from_secs(15), || fs::read_dir(&trash)
                    .is_ok_and(|mut d| d.next().is_none())),
                "the plugin's .trash is not emptied"
            );
            ensure!(
                e.overlays()?.is_empty(),
                "overlays left: {:?}",
                e.overlays()?
            );
            let now = e.snapshot(&compose_base)?;
            ensure!(now == compose_base_before, "the base changed: {now:?}");
            Ok(())
        },
    );

    report.step(
        "swarm: init a single-node swarm on 127.0.0.1; the node advertises the plugin",
        || {
            let e = env.as_mut().ok_or("no environment: setup failed")?;
            // A node reports to the scheduler the volume drivers its dockerd has loaded, and
            // dockerd loads a socket plugin only when something uses it: on a fresh node a
            // task stays pending with "no suitable node (missing plugin on 1 node)" (measured
            // with Debian's docker.io 20.10; once in swarm mode, even `docker volume ls` does
            // not load it). A volume created (and removed) with the driver loads it.
            let probe_base = e.base("probe", &[])?;
            let probe_opt = format!("base={}", probe_base.display());
            e.docker(&[
                "volume",
                "create",
                "--driver",
                DRIVER,
                "-o",
                &probe_opt,
                "dot-probe",
            ])?;
            e.docker(&["volume", "rm", "dot-probe"])?;
            let listen = format!("{SWARM_ADDR}:2377");
            let init = e.docker(&[
                "swarm",
                "init",
                "--advertise-addr",
                SWARM_ADDR,
                "--listen-addr",
                &listen,
            ]);
            if let Err(err) = init {
                return Err(format!(
                    "Swarm cannot start in this environment: {err}; dockerd's log: {}",
                    tail(&e.docker.log, 20)
                ));
            }
            e.swarm = true;
            let state = e.docker(&[
                "info",
                "-f",
                "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}} {{.Swarm.Error}}",
            ])?;
            ensure!(
                state.trim() == "active true",
                "after swarm init the node is {state:?}"
            );
            let plugins = "{{range .Description.Engine.Plugins}}{{.Type}}/{{.Name}} {{end}}";
            let mut seen = String::new();
            let advertised = wait_until(Duration::from_secs(60), || {
                seen = e
                    .docker(&["node", "inspect", "self", "-f", plugins])
                    .unwrap_or_default();
                seen.split_whitespace().any(|p| p == "Volume/docker-on-top")
            });
            ensure!(
                advertised,
                "the swarm node does not advertise the volume plugin: {seen}"
            );
            Ok(())
        },
    );
    let mut swarm_base = PathBuf::new();
    let mut swarm_base_before = BTreeMap::new();

    report.step(
        "swarm: a service's task mounts a docker-on-top volume; it reads the base, writes the upper",
        || {
            let e = the(&env)?;
            swarm_base = e.base("swarm", &base_files)?;
            swarm_base_before = e.snapshot(&swarm_base)?;
            let mount = format!(
                "type=volume,source={SWARM_VOLUME},destination=/data,volume-driver={DRIVER},volume-opt=base={}",
                swarm_base.display()
            );
            let script =
                format!("cat /data/f.txt > /data/seen.txt && echo task > /data/task.txt && {LONG_RUNNING}");
            e.docker(&[
                "service",
                "create",
                "--detach",
                // The image is local: no registry to ask for its digest.
                "--no-resolve-image",
                "--name",
                SERVICE,
                "--restart-condition",
                "none",
                "--mount",
                &mount,
                IMAGE,
                "sh",
                "-c",
                &script,
            ])?;
            let mut state = String::new();
            let running = wait_until(Duration::from_secs(90), || {
                state = e
                    .docker(&[
                        "service",
                        "ps",
                        SERVICE,
                        "--no-trunc",
                        "--format",
                        "{{.CurrentState}} | {{.Error}}",
                    ])
                    .unwrap_or_default();
                state.starts_with("Running")
            });
            ensure!(running, "the service's task did not start: {}", state.trim());
            let upper = e.upper(SWARM_VOLUME);
            ensure!(
                wait_until(Duration::from_secs(30), || upper.join("task.txt").is_file()),
                "the task's write is not in {}",
                upper.display()
            );
            let seen = fs::read_to_string(upper.join("seen.txt")).ctx("reading upper/seen.txt")?;
            ensure!(seen == "from the base\n", "the task read {seen:?} from the base");
            let container = e.task_container()?;
            let live = e.docker(&["exec", &container, "sh", "-c", "ls /data"])?;
            ensure!(
                live == "f.txt\nkeep.txt\nseen.txt\ntask.txt\n",
                "the task sees {live:?}"
            );
            let vol = e.get(SWARM_VOLUME)?;
            ensure!(
                vol["Status"]["Base"] == json!(swarm_base.display().to_string())
                    && vol["Mountpoint"].is_string()
                    && vol["Status"]["ActiveMounts"] == json!(1),
                "Get while the task runs: {vol}"
            );
            e.expect_mounted(SWARM_VOLUME, true, 1, "while the task runs")?;
            let now = e.snapshot(&swarm_base)?;
            ensure!(now == swarm_base_before, "the base changed: {now:?}");
            Ok(())
        },
    );

    report.step(
        "swarm: service rm unmounts the volume; its changes stay in the upper",
        || {
            let e = the(&env)?;
            e.docker(&["service", "rm", SERVICE])?;
            // The task's container goes a moment after the service.
            let mut left = String::new();
            let gone = wait_until(Duration::from_secs(60), || {
                left = e.docker(&["ps", "-aq"]).unwrap_or_else(|e| e);
                left.trim().is_empty()
            });
            ensure!(gone, "the task's container is still there: {left:?}");
            e.expect_mounted(SWARM_VOLUME, false, 0, "after service rm")?;
            let vol = e.get(SWARM_VOLUME)?;
            ensure!(
                vol.get("Mountpoint").is_none()
                    && vol["Status"]["Mounted"] == json!(false)
                    && vol["Status"]["ActiveMounts"] == json!(0),
                "Get after service rm: {vol}"
            );
            let task = fs::read_to_string(e.upper(SWARM_VOLUME).join("task.txt"))
                .ctx("reading upper/task.txt")?;
            ensure!(task == "task\n", "upper/task.txt holds {task:?}");
            // Swarm never removes a service's volumes.
            e.docker(&["volume", "rm", SWARM_VOLUME])?;
            ensure!(
                !e.root.join(SWARM_VOLUME).exists(),
                "{SWARM_VOLUME} is still in the plugin's state root after volume rm"
            );
            let now = e.snapshot(&swarm_base)?;
            ensure!(now == swarm_base_before, "the base changed: {now:?}");
            Ok(())
        },
    );

    report.step(
        "swarm: leave --force; no container, volume or overlay is left",
        || {
            let e = env.as_mut().ok_or("no environment: setup failed")?;
            e.docker(&["swarm", "leave", "--force"])?;
            e.swarm = false;
            let state = e.docker(&["info", "-f", "{{.Swarm.LocalNodeState}}"])?;
            ensure!(
                state.trim() == "inactive",
                "after leaving, the node is {state:?}"
            );
            let left = e.docker(&["ps", "-aq"])?;
            ensure!(left.trim().is_empty(), "containers left: {left:?}");
            let volumes = e.docker(&["volume", "ls", "-q"])?;
            ensure!(volumes.trim().is_empty(), "volumes left: {volumes:?}");
            ensure!(
                e.overlays()?.is_empty(),
                "overlays left: {:?}",
                e.overlays()?
            );
            Ok(())
        },
    );

    let mut warnings = Vec::new();
    if let Some(e) = env {
        if report.failed() {
            println!(
                "\n----- last 40 lines of the plugin's log -----\n{}",
                tail(&e.plugin_log, 40)
            );
            println!(
                "\n----- last 40 lines of dockerd's log -----\n{}",
                tail(&e.docker.log, 40)
            );
            println!("\n(full logs: target/tmp/compose-swarm/)");
        }
        warnings.extend(e.teardown());
    }
    if report.finish(&warnings) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
