//! docker-on-top as a managed plugin (issue 17): the bundle `make plugin` builds
//! (`scripts/plugin-bundle`), created and enabled in a private dockerd, driven by the real
//! `docker` CLI through dockerd's own plugin system.
//!
//! Isolation (see `tests/common/host.rs`): dockerd runs in a private mount namespace with
//! private tmpfs on `/run/docker/plugins`, `/etc/docker` and `/run/containerd`, its own data
//! root, exec root, socket and cgroup parent. The plugin's state directory is the host's
//! `/var/lib/docker-on-top` (config.json binds it): in the namespace a directory of the test's
//! is bound there, so the host's volumes are never seen or touched. dockerd starts the plugin
//! in a cgroup named after the plugin's ID, outside the cgroup parent; the teardown disables
//! and removes the plugin, and kills whatever is left in that cgroup.
//!
//! Every step runs after the one before it (a failed step fails the rest as not run); none is
//! skipped. Logs are copied to `target/tmp/plugin/`.

mod common;
#[path = "common/host.rs"]
mod host;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use rustix::process::Signal;
use serde_json::Value;

use host::{
    Context, Dockerd, Output, Report, Res, Sandbox, ensure, find_busybox, kill, kill_cgroup,
    remove_cgroups, run_cmd, run_ok, stdout_suffix, tail, wait_until,
};

const BIN: &str = env!("CARGO_BIN_EXE_docker-on-top");
const BUNDLE_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/plugin-bundle");
const IMAGE: &str = "dot-plugin:latest";
/// The plugin's name, and the driver's as dockerd reports it.
const PLUGIN: &str = "docker-on-top";
const DRIVER: &str = "docker-on-top:latest";
/// Where config.json binds the state, in the namespace as on a host.
const STATE: &str = "/var/lib/docker-on-top";
const TIMEOUT: Duration = Duration::from_secs(120);
const LONG_RUNNING: &str = "trap 'exit 0' TERM INT; while :; do sleep 1 & wait $!; done";
/// Private tmpfs mounts hiding the host's plugin sockets and specs, Docker config and
/// containerd from the private dockerd (as in tests/docker.rs).
const PRIVATE_TMPFS: [&str; 3] = ["/run/docker/plugins", "/etc/docker", "/run/containerd"];
/// What a Mount answers when dockerd cannot see the overlay mounted for it.
const CUT_OFF: &str = "cannot see it: the plugin's mount directory no longer reaches dockerd's";

struct Env {
    sandbox: Sandbox,
    docker: Dockerd,
    /// The test's directory bound on `/var/lib/docker-on-top` in the namespace.
    state: PathBuf,
    bases: PathBuf,
    /// `make plugin-tar`'s archive, for the upgrade.
    tarball: PathBuf,
    /// The plugin's ID (dockerd's), once created.
    id: String,
}

impl Env {
    fn docker(&self, args: &[&str]) -> Res<String> {
        self.docker.ok(args, TIMEOUT)
    }

    /// `docker ARGS`, which must fail; returns its stderr.
    fn docker_fails(&self, args: &[&str]) -> Res<String> {
        let out = run_cmd(self.docker.cmd().args(args), TIMEOUT)?;
        ensure!(
            !out.success(),
            "`docker {}` succeeded: {}",
            args.join(" "),
            out.stdout
        );
        Ok(out.stderr)
    }

    /// `docker run --rm --network none -v VOLUME:/x IMAGE sh -c SCRIPT`; its stdout.
    fn run(&self, volume: &str, script: &str) -> Res<String> {
        let mount = format!("{volume}:/x");
        self.docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &mount,
            IMAGE,
            "sh",
            "-c",
            script,
        ])
    }

    /// What a container with `volume` at /x sees there (`ls /x`), just after dockerd's restart:
    /// read from the file the container writes into the volume, not from `docker run`'s output.
    ///
    /// Now and then (once in CI, once in four full runs of the suite here) dockerd 20.10's
    /// restart leaves the plugin started again with mounts that no longer reach the place
    /// dockerd binds volumes from: before the plugin checked, containers got the bare
    /// `propagated-mount/NAME`. The plugin now refuses that Mount and stops, dockerd starts it
    /// again, and the container is run once more.
    fn ls_after_restart(&self, volume: &str) -> Res<String> {
        let script = "ls /x > /tmp/seen && cp /tmp/seen /x/seen.txt";
        let before = self.plugin_pids();
        match self.run(volume, script) {
            Err(err) if err.contains(CUT_OFF) => {
                println!(
                    "plugin: after dockerd's restart the plugin's mounts did not reach dockerd: \
                     {err}\ndockerd's mounts of the plugin's directory then: {:#?}",
                    self.plugin_dir_mounts()
                );
                self.wait_restarted(&before)?;
                self.run(volume, script)?;
            }
            result => {
                result?;
            }
        }
        let in_upper = self.upper(volume).join("seen.txt");
        fs::read_to_string(&in_upper).map_err(|_| {
            let bare = self.propagated().join(volume).join("seen.txt");
            format!(
                "the container's seen.txt is not in {} ({} it went to the bare {}); dockerd's \
                 mounts of the plugin's directory: {:#?}",
                in_upper.display(),
                if bare.exists() { "but" } else { "nor" },
                bare.display(),
                self.plugin_dir_mounts()
            )
        })
    }

    /// The lines of dockerd's mount table below the plugin's directory.
    fn plugin_dir_mounts(&self) -> Vec<String> {
        let info = fs::read_to_string(format!("/proc/{}/mountinfo", self.sandbox.anchor_pid))
            .unwrap_or_default();
        (info.lines())
            .filter(|l| l.contains(&self.id))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until dockerd has started the plugin again: other processes than `before`, and
    /// enabled.
    fn wait_restarted(&self, before: &std::collections::BTreeSet<u32>) -> Res {
        ensure!(
            wait_until(Duration::from_secs(60), || {
                let now = self.plugin_pids();
                !now.is_empty() && now.is_disjoint(before) && self.enabled().unwrap_or(false)
            }),
            "dockerd did not start the plugin again: processes {before:?}, then {:?}",
            self.plugin_pids()
        );
        Ok(())
    }

    /// A detached container with `volume` at /x, running until stopped.
    fn start(&self, name: &str, volume: &str) -> Res {
        let mount = format!("{volume}:/x");
        self.docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "-v",
            &mount,
            IMAGE,
            "sh",
            "-c",
            LONG_RUNNING,
        ])?;
        Ok(())
    }

    fn exec(&self, container: &str, script: &str) -> Res<String> {
        self.docker(&["exec", container, "sh", "-c", script])
    }

    fn create(&self, volume: &str, opts: &[String]) -> Res {
        let mut args = vec!["volume", "create", "--driver", PLUGIN];
        for o in opts {
            args.extend(["-o", o.as_str()]);
        }
        args.push(volume);
        self.docker(&args)?;
        Ok(())
    }

    /// A volume over a fresh base holding `files` (both named `name`); returns the base.
    fn volume(&self, name: &str, files: &[(&str, &str)], volatile: bool) -> Res<PathBuf> {
        let base = self.base(name, files)?;
        let mut opts = vec![format!("base={}", base.display())];
        if volatile {
            opts.push("volatile=true".into());
        }
        self.create(name, &opts)?;
        Ok(base)
    }

    /// A fresh base directory holding `files`.
    fn base(&self, name: &str, files: &[(&str, &str)]) -> Res<PathBuf> {
        host::make_tree(&self.bases.join(name), files)
    }

    fn upper(&self, volume: &str) -> PathBuf {
        self.state.join(volume).join("upper")
    }

    /// The volume's mount records: mount ID to use count.
    fn records(&self, volume: &str) -> Res<BTreeMap<String, u64>> {
        host::mount_records(&self.state.join(volume))
    }

    /// The plugin's propagated mount on the "host" (dockerd's namespace).
    fn propagated(&self) -> PathBuf {
        self.sandbox
            .tmp
            .join("data/plugins")
            .join(&self.id)
            .join("propagated-mount")
    }

    /// Whether the volume's overlay is mounted where dockerd finds it.
    fn mounted(&self, volume: &str) -> Res<bool> {
        let target = self.propagated().join(volume);
        let info = fs::read(format!("/proc/{}/mountinfo", self.sandbox.anchor_pid))
            .ctx("reading the namespace's mountinfo")?;
        Ok(common::daemon::parse_mountinfo(&info)
            .iter()
            .any(|m| m.mount_point == target && m.fstype == "overlay"))
    }

    fn expect_unmounted(&self, volume: &str, when: &str) -> Res {
        ensure!(
            !self.mounted(volume)?,
            "volume {volume} is still mounted {when}"
        );
        let records = self.records(volume)?;
        ensure!(
            records.is_empty(),
            "volume {volume} has mount records {when}: {records:?}"
        );
        Ok(())
    }

    /// `docker-on-top ARGS` (the admin commands, default `--root`) in the namespace, as an
    /// admin on the host runs them.
    fn admin(&self, args: &[&str]) -> Res<Output> {
        run_cmd(self.sandbox.ns_command(BIN).args(args), TIMEOUT)
    }

    fn admin_ok(&self, args: &[&str]) -> Res<String> {
        let out = self.admin(args)?;
        ensure!(
            out.success(),
            "`docker-on-top {}` failed ({:?}): {}{}",
            args.join(" "),
            out.code,
            out.stderr.trim(),
            stdout_suffix(&out.stdout)
        );
        Ok(out.stdout)
    }

    /// The plugin's log lines (dockerd logs them with `plugin=ID`).
    fn plugin_log(&self) -> Res<String> {
        let log = fs::read_to_string(&self.docker.log).ctx("reading dockerd's log")?;
        Ok(log
            .lines()
            .filter(|l| l.contains("plugin="))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// The files below `dir` with their contents.
    fn snapshot(&self, dir: &Path) -> Res<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).ctx(format!("listing {}", d.display()))? {
                let path = entry.ctx("listing")?.path();
                let rel = path.strip_prefix(dir).unwrap().display().to_string();
                if path.is_dir() {
                    out.insert(rel, "<dir>".into());
                    stack.push(path);
                } else {
                    out.insert(rel, fs::read_to_string(&path).unwrap_or_default());
                }
            }
        }
        Ok(out)
    }

    /// `kill -9` of dockerd; returns once its containerd is gone too (the restarted dockerd
    /// starts a new containerd only once the old one's pid is gone, as in tests/docker.rs).
    fn kill9_dockerd(&mut self) -> Res {
        let pid = self.docker.pid;
        let containerd =
            fs::read_to_string(self.sandbox.tmp.join("exec/containerd/containerd.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
        kill(pid, Signal::KILL);
        ensure!(
            wait_until(Duration::from_secs(30), || self
                .sandbox
                .exited(pid)
                .is_some()),
            "dockerd did not die"
        );
        if let Some(c) = containerd {
            ensure!(
                wait_until(Duration::from_secs(30), || !Path::new(&format!(
                    "/proc/{c}"
                ))
                .exists()),
                "dockerd's containerd (pid {c}) is still there 30 s after dockerd's kill -9"
            );
        }
        Ok(())
    }

    /// dockerd started again with `extra` flags; returns once the plugin is enabled.
    fn restart_dockerd(&mut self, extra: &[&str]) -> Res {
        self.docker = self.sandbox.start_dockerd_with(&[], extra)?;
        ensure!(
            wait_until(Duration::from_secs(60), || self.enabled().unwrap_or(false)),
            "the plugin is not enabled after dockerd's restart"
        );
        Ok(())
    }

    /// The plugin's processes: those in its cgroup (named after its ID).
    fn plugin_pids(&self) -> std::collections::BTreeSet<u32> {
        (host::cgroup_dirs(&self.id).iter())
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|procs| {
                (procs.lines())
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }

    fn enabled(&self) -> Res<bool> {
        Ok(self
            .docker(&["plugin", "inspect", "-f", "{{.Enabled}}", PLUGIN])?
            .trim()
            == "true")
    }

    /// Stops what the plugin runs (a crashed step may leave containers) and removes the
    /// plugin, then stops dockerd; returns warnings. Whatever is left in the plugin's cgroup
    /// is killed.
    fn teardown(mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            for id in ids.split_whitespace() {
                let _ = self.docker(&["rm", "-f", id]);
            }
        }
        let _ = self.docker(&["plugin", "disable", "-f", PLUGIN]);
        let _ = self.docker(&["plugin", "rm", "-f", PLUGIN]);
        if let Err(e) = self
            .sandbox
            .terminate(self.docker.pid, Duration::from_secs(30))
        {
            warnings.push(format!("stopping dockerd: {e}"));
        }
        let logs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin");
        let _ = fs::create_dir_all(&logs);
        let _ = fs::copy(&self.docker.log, logs.join("dockerd.log"));
        if !self.id.is_empty() {
            kill_cgroup(&self.id, 100, Duration::from_millis(20));
            warnings.extend(remove_cgroups(
                &self.id,
                Duration::from_secs(5),
                Duration::from_millis(20),
            ));
        }
        warnings.extend(self.sandbox.destroy());
        warnings
    }
}

fn setup() -> Res<Env> {
    host::require_programs(&host::DOCKER_PROGRAMS)?;
    host::require_programs(&[("ldd", "libc-bin")])?;
    let busybox = find_busybox()?;
    let mut sandbox = Sandbox::new("plugin", &PRIVATE_TMPFS)?;
    let t = sandbox.tmp.clone();
    let state = t.join("state");
    fs::create_dir(&state).ctx("creating the state directory")?;
    sandbox.bind(&state, STATE)?;
    // The bases' directory a shared mount, as everything is on a host booted by systemd (the
    // namespace made it private): what the host mounts there later must reach the plugin.
    let bases = t.join("bases");
    fs::create_dir(&bases).ctx("creating the bases' directory")?;
    let b = bases.to_string_lossy();
    for args in [&["--bind", &*b, &*b][..], &["--make-shared", &*b]] {
        run_ok(sandbox.ns_command("mount").args(args), TIMEOUT)?;
    }
    let docker = sandbox.start_dockerd()?;
    let env = Env {
        sandbox,
        docker,
        state,
        bases,
        tarball: t.join("docker-on-top-plugin.tar.gz"),
        id: String::new(),
    };
    env.docker.import_busybox(&busybox, &t, IMAGE)?;
    Ok(env)
}

/// What a bundle's rootfs holds: every file, relative.
fn files_below(dir: &Path) -> Res<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).ctx(format!("listing {}", d.display()))? {
            let path = entry.ctx("listing")?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The README's switch between the service and the managed plugin, first half: dockerd made
/// to forget `volumes` while the driver they were made with still serves. Each volume's
/// directory is moved aside, so that `volume rm` finds it gone in the driver and only drops
/// dockerd's record (answering "no such volume"), and moved back. The driver that serves next
/// hands them to dockerd again, under its own name, when dockerd lists volumes.
fn forget_volumes(e: &Env, volumes: &[&str]) -> Res {
    for v in volumes {
        let aside = e.state.join(format!(".switching-{v}"));
        fs::rename(e.state.join(v), &aside).ctx(format!("moving {v} aside"))?;
        let dropped = run_cmd(e.docker.cmd().args(["volume", "rm", v]), TIMEOUT);
        fs::rename(&aside, e.state.join(v)).ctx(format!("moving {v} back"))?;
        let dropped = dropped?;
        ensure!(
            dropped.success() || dropped.stderr.contains("no such volume"),
            "volume rm {v} with its directory moved aside: {}",
            dropped.stderr
        );
    }
    Ok(())
}

/// `docker volume ls` lists each of `volumes` with `driver`.
fn expect_listed(e: &Env, volumes: &[&str], driver: &str) -> Res {
    let listed = e.docker(&["volume", "ls", "--format", "{{.Name}} {{.Driver}}"])?;
    for v in volumes {
        ensure!(
            listed.lines().any(|l| l == format!("{v} {driver}")),
            "volume {v} is not listed with driver {driver}: {listed:?}"
        );
    }
    Ok(())
}

fn the(env: &mut Option<Env>) -> Res<&mut Env> {
    env.as_mut()
        .ok_or_else(|| "no environment: setup failed".to_owned())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("plugin: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| "plugin".contains(f.as_str())) {
        println!("plugin: not selected\n0 passed, 0 failed");
        return ExitCode::SUCCESS;
    }
    let mut report = Report::new("plugin");
    let mut env: Option<Env> = None;
    report.step("setup: private dockerd, busybox image", || {
        env = Some(setup()?);
        Ok(())
    });

    report.step(
        "the host service made a volume and its changes (before the switch to the managed plugin)",
        || {
            let e = the(&mut env)?;
            let base = e.base("switch", &[("f.txt", "base\n")])?;
            let log = e.sandbox.tmp.join("service.log");
            let pid = e.sandbox.start_plugin(BIN, Path::new(STATE), &[], &log)?;
            e.create("switch", &[format!("base={}", base.display())])?;
            e.run("switch", "echo by-service > /x/service.txt")?;
            let driver = e.docker(&["volume", "inspect", "-f", "{{.Driver}}", "switch"])?;
            ensure!(
                driver.trim() == PLUGIN,
                "the service's volume has driver {driver:?}"
            );
            forget_volumes(e, &["switch"])?;
            e.sandbox.terminate(pid, Duration::from_secs(30))?;
            ensure!(
                e.upper("switch").join("service.txt").exists(),
                "dockerd's forgetting the volume changed its state"
            );
            Ok(())
        },
    );

    report.step(
        "make plugin: the bundle holds config.json, the binary and only the libraries it links",
        || {
            let e = the(&mut env)?;
            let bundle = e.sandbox.tmp.join("bundle");
            let mut cmd = Command::new(BUNDLE_SCRIPT);
            cmd.arg(BIN).arg(&bundle).arg(&e.tarball);
            run_ok(&mut cmd, TIMEOUT)?;
            let config: Value = serde_json::from_str(
                &fs::read_to_string(bundle.join("config.json")).ctx("reading config.json")?,
            )
            .ctx("parsing config.json")?;
            ensure!(
                config["network"]["type"] == "none"
                    && config["propagatedMount"] == "/mnt/volumes"
                    && config["interface"]["types"][0] == "docker.volumedriver/1.0"
                    && config["linux"]["allowAllDevices"] != true,
                "config.json: {config}"
            );
            let libs = run_ok(Command::new("ldd").arg(BIN), TIMEOUT)?;
            let mut expected: Vec<String> = libs
                .lines()
                .filter_map(|l| {
                    let words: Vec<&str> = l.split_whitespace().collect();
                    match words.as_slice() {
                        [_, "=>", path, ..] if path.starts_with('/') => Some(path.to_string()),
                        [path, ..] if path.starts_with('/') => Some(path.to_string()),
                        _ => None,
                    }
                })
                .map(|p| p.trim_start_matches('/').to_owned())
                .chain(["docker-on-top".to_owned()])
                .collect();
            expected.sort();
            let found = files_below(&bundle.join("rootfs"))?;
            ensure!(
                found == expected,
                "the rootfs holds {found:?}, expected exactly {expected:?}"
            );
            ensure!(e.tarball.is_file(), "no archive at {}", e.tarball.display());
            e.docker(&["plugin", "create", PLUGIN, &bundle.to_string_lossy()])?;
            e.id = e
                .docker(&["plugin", "inspect", "-f", "{{.Id}}", PLUGIN])?
                .trim()
                .to_owned();
            e.docker(&["plugin", "enable", PLUGIN])?;
            ensure!(e.enabled()?, "the plugin is not enabled");
            Ok(())
        },
    );

    report.step(
        "the switch from the service (README): after dockerd's restart the managed plugin has the service's volume",
        || {
            let e = the(&mut env)?;
            // dockerd keeps a driver it has used by name while it runs.
            e.sandbox.terminate(e.docker.pid, Duration::from_secs(60))?;
            e.restart_dockerd(&[])?;
            expect_listed(e, &["switch"], DRIVER)
        },
    );

    let cow_files = [("a.txt", "from the base\n"), ("sub/b.txt", "b\n")];
    report.step(
        "copy-on-write over a host base: the container changes it, the host's base stays",
        || {
            let e = the(&mut env)?;
            let base = e.base("cow", &cow_files)?;
            let before = e.snapshot(&base)?;
            e.create("cow", &[format!("base={}", base.display())])?;
            let out = e.run(
                "cow",
                "cat /x/a.txt && echo changed > /x/a.txt && rm /x/sub/b.txt && echo new > /x/new.txt && ls /x /x/sub",
            )?;
            ensure!(
                out == "from the base\n/x:\na.txt\nnew.txt\nsub\n\n/x/sub:\n",
                "the container saw {out:?}"
            );
            ensure!(e.snapshot(&base)? == before, "the host's base changed");
            let upper = e.upper("cow");
            ensure!(
                fs::read_to_string(upper.join("a.txt")).ok().as_deref() == Some("changed\n")
                    && fs::read_to_string(upper.join("new.txt")).ok().as_deref() == Some("new\n"),
                "the changes are not in {}",
                upper.display()
            );
            e.expect_unmounted("cow", "after the container exited")?;
            let inspect = e.docker(&["volume", "inspect", "cow"])?;
            let vol: Value = serde_json::from_str(&inspect).ctx("parsing volume inspect")?;
            ensure!(
                vol[0]["Driver"] == DRIVER
                    && vol[0]["Status"]["Base"] == base.display().to_string()
                    && vol[0]["Status"]["UpperDir"] == format!("{STATE}/cow/upper"),
                "volume inspect: {inspect}"
            );
            ensure!(
                !inspect.contains("/host"),
                "the plugin's host prefix shows in volume inspect: {inspect}"
            );
            Ok(())
        },
    );

    report.step(
        "the service's volume under the managed plugin: listed, its changes there",
        || {
            let e = the(&mut env)?;
            let out = e.run(
                "switch",
                "cat /x/f.txt /x/service.txt && echo by-plugin > /x/plugin.txt",
            )?;
            ensure!(
                out == "base\nby-service\n",
                "the service's volume shows {out:?}"
            );
            let volumes = e.docker(&["volume", "ls", "--format", "{{.Name}} {{.Driver}}"])?;
            ensure!(
                volumes.lines().any(|l| l == format!("switch {DRIVER}")),
                "volume ls under the managed plugin: {volumes:?}"
            );
            Ok(())
        },
    );

    report.step(
        "two containers share live changes; the admin commands on the host see the mount",
        || {
            let e = the(&mut env)?;
            e.volume("shared", &[("f.txt", "base\n")], false)?;
            e.start("share-a", "shared")?;
            e.start("share-b", "shared")?;
            e.exec("share-a", "echo live > /x/live.txt")?;
            let seen = e.exec("share-b", "cat /x/live.txt /x/f.txt")?;
            ensure!(seen == "live\nbase\n", "the second container saw {seen:?}");
            ensure!(
                e.mounted("shared")?,
                "the overlay is not in the propagated mount"
            );
            // The overlay, as the host sees it through the propagated mount, is no base.
            let inside = format!("base={}", e.propagated().join("shared").display());
            let err = e.docker_fails(&[
                "volume", "create", "--driver", PLUGIN, "-o", &inside, "stacked",
            ])?;
            ensure!(
                err.contains("is in a file system this plugin mounted for a volume")
                    && !e.state.join("stacked").exists(),
                "a volume made of the mounted overlay of another: {err}"
            );
            ensure!(
                e.records("shared")?.len() == 2,
                "records: {:?}",
                e.records("shared")?
            );
            let ls: Value =
                serde_json::from_str(&e.admin_ok(&["ls", "--json"])?).ctx("parsing ls --json")?;
            let entry = (ls.as_array().into_iter().flatten())
                .find(|v| v["Name"] == "shared")
                .cloned()
                .unwrap_or_default();
            ensure!(
                entry["Mounted"] == true,
                "docker-on-top ls does not see the plugin's mount: {entry}"
            );
            let changes = e.admin_ok(&["changes", "shared"])?;
            ensure!(changes == "A /live.txt\n", "changes: {changes:?}");
            let reset = e.admin(&["reset", "shared"])?;
            ensure!(
                !reset.success() && reset.stderr.contains("in use"),
                "reset of a volume in use: {reset:?}"
            );
            ensure!(
                e.upper("shared").join("live.txt").exists(),
                "the refused reset changed the upper"
            );
            e.docker(&["rm", "-f", "share-a", "share-b"])?;
            e.expect_unmounted("shared", "after both containers went")?;
            e.admin_ok(&["reset", "shared"])?;
            ensure!(
                e.run("shared", "ls /x")? == "f.txt\n",
                "after reset the volume still has changes"
            );
            Ok(())
        },
    );

    report.step(
        "volatile: changes stay recoverable after the last container, and are gone at the next mount",
        || {
            let e = the(&mut env)?;
            e.volume("volatile", &[("f.txt", "base\n")], true)?;
            e.run("volatile", "echo scratch > /x/scratch.txt")?;
            e.expect_unmounted("volatile", "after the container exited")?;
            let dest = e.sandbox.tmp.join("recovered");
            e.admin_ok(&["recover", "volatile", &dest.to_string_lossy()])?;
            ensure!(
                fs::read_to_string(dest.join("scratch.txt")).ok().as_deref() == Some("scratch\n"),
                "recover did not copy scratch.txt"
            );
            let out = e.run("volatile", "ls /x")?;
            ensure!(out == "f.txt\n", "the next container saw {out:?}");
            Ok(())
        },
    );

    report.step(
        "docker cp into and out of a volume, with its container running and stopped",
        || {
            let e = the(&mut env)?;
            e.volume("cp", &[("f.txt", "base\n")], false)?;
            e.docker(&[
                "create",
                "--name",
                "cp-c",
                "--network",
                "none",
                "-v",
                "cp:/x",
                IMAGE,
                "true",
            ])?;
            let file = e.sandbox.tmp.join("copied.txt");
            fs::write(&file, "copied\n").ctx("writing copied.txt")?;
            e.docker(&["cp", &file.to_string_lossy(), "cp-c:/x/copied.txt"])?;
            let out_dir = e.sandbox.tmp.join("cp-out");
            fs::create_dir(&out_dir).ctx("creating cp-out")?;
            e.docker(&["cp", "cp-c:/x/f.txt", &out_dir.to_string_lossy()])?;
            ensure!(
                fs::read_to_string(out_dir.join("f.txt")).ok().as_deref() == Some("base\n"),
                "docker cp out of the volume"
            );
            ensure!(
                fs::read_to_string(e.upper("cp").join("copied.txt"))
                    .ok()
                    .as_deref()
                    == Some("copied\n"),
                "docker cp into the volume did not reach its upper"
            );
            e.expect_unmounted("cp", "after docker cp")?;
            e.docker(&["rm", "cp-c"])?;
            // While a container runs, dockerd mounts the volume once more for the copy (with
            // the container's mount ID) and unmounts it again.
            e.start("cp-r", "cp")?;
            let live = e.sandbox.tmp.join("live.txt");
            fs::write(&live, "live\n").ctx("writing live.txt")?;
            e.docker(&["cp", &live.to_string_lossy(), "cp-r:/x/live.txt"])?;
            let seen = e.exec("cp-r", "cat /x/live.txt /x/copied.txt")?;
            ensure!(
                seen == "live\ncopied\n",
                "the running container sees {seen:?}"
            );
            ensure!(
                e.mounted("cp")? && e.records("cp")?.values().sum::<u64>() == 1,
                "after docker cp while running: mounted {}, records {:?}",
                e.mounted("cp")?,
                e.records("cp")?
            );
            e.docker(&["rm", "-f", "cp-r"])?;
            e.expect_unmounted("cp", "after the running container went")?;
            Ok(())
        },
    );

    report.step(
        "a base with spaces, commas and colons, and a host symlink with an absolute target",
        || {
            let e = the(&mut env)?;
            let odd = e.base("odd dir,with:colons", &[("f.txt", "odd\n")])?;
            e.create("odd", &[format!("base={}", odd.display())])?;
            ensure!(e.run("odd", "cat /x/f.txt")? == "odd\n", "odd base");
            // Resolved in the host's tree: inside the plugin this absolute target means
            // nothing without the host prefix.
            let real = e.base("real", &[("f.txt", "real\n")])?;
            let link = e.bases.join("link");
            std::os::unix::fs::symlink(&real, &link).ctx("making the symlink")?;
            e.create("linked", &[format!("base={}", link.display())])?;
            ensure!(e.run("linked", "cat /x/f.txt")? == "real\n", "linked base");
            let stored = e.docker(&["volume", "inspect", "-f", "{{.Status.Base}}", "linked"])?;
            ensure!(
                stored.trim() == real.display().to_string(),
                "the symlinked base is stored as {stored:?}"
            );
            Ok(())
        },
    );

    report.step(
        "a file system the host mounts after the plugin started is a base like any other",
        || {
            let e = the(&mut env)?;
            // Mounted in dockerd's namespace (the test's "host"), not in the test's own.
            let late = e.bases.join("late");
            fs::create_dir(&late).ctx("creating the mount point")?;
            run_ok(
                e.sandbox
                    .ns_command("mount")
                    .args(["-t", "tmpfs", "dot-late"])
                    .arg(&late),
                TIMEOUT,
            )?;
            fs::write(e.sandbox.ns_path(late.join("f.txt")), "late\n")
                .ctx("writing into the late file system")?;
            e.create("late", &[format!("base={}", late.display())])?;
            let out = e.run("late", "cat /x/f.txt")?;
            ensure!(out == "late\n", "the late file system's base shows {out:?}");
            Ok(())
        },
    );

    report.step(
        "bad input through the CLI: a clear error, no /host prefix, nothing made",
        || {
            let e = the(&mut env)?;
            let file = e.bases.join("a-file");
            fs::write(&file, "x").ctx("writing a file")?;
            let before = fs::read_dir(&e.state).ctx("listing the state")?.count();
            let cases: [(&[String], &str); 8] = [
                (&[], "option \"base\" is required"),
                (&["base=rel/dir".into()], "is not an absolute path"),
                (
                    &[format!("base={}/missing", e.bases.display())],
                    "cannot be used",
                ),
                (&[format!("base={}", file.display())], "is not a directory"),
                (&[format!("base={STATE}")], "overlaps the state directory"),
                (
                    &[format!("base={}", e.bases.display()), "color=red".into()],
                    "unknown option \"color\"",
                ),
                (
                    &[
                        format!("base={}", e.bases.display()),
                        "volatile=maybe".into(),
                    ],
                    "volatile must be",
                ),
                (
                    &[format!("base={}", e.bases.display()), "size=64M".into()],
                    "sized volumes need docker-on-top running as a host service",
                ),
            ];
            for (i, (opts, expected)) in cases.iter().enumerate() {
                let name = format!("bad{i}");
                let mut args = vec!["volume", "create", "--driver", PLUGIN];
                for o in opts.iter() {
                    args.extend(["-o", o.as_str()]);
                }
                args.push(&name);
                let err = e.docker_fails(&args)?;
                ensure!(
                    err.contains(expected) && !err.contains("/host"),
                    "{opts:?}: expected an error with {expected:?} and no /host prefix: {err}"
                );
            }
            let after = fs::read_dir(&e.state).ctx("listing the state")?.count();
            ensure!(
                after == before,
                "refused creates left entries in the state directory"
            );
            Ok(())
        },
    );

    report.step(
        "settings through docker plugin set: allowed bases and the log level",
        || {
            let e = the(&mut env)?;
            let allowed = e.base("allowed", &[("f.txt", "allowed\n")])?;
            let outside = e.base("outside", &[])?;
            e.docker(&["plugin", "disable", "-f", PLUGIN])?;
            let setting = format!("DOCKER_ON_TOP_ALLOWED_BASES={}", allowed.display());
            e.docker(&["plugin", "set", PLUGIN, &setting, "RUST_LOG=debug"])?;
            e.docker(&["plugin", "enable", PLUGIN])?;
            let err = e.docker_fails(&[
                "volume",
                "create",
                "--driver",
                PLUGIN,
                "-o",
                &format!("base={}", outside.display()),
                "outside",
            ])?;
            ensure!(
                err.contains("is outside the directories this plugin allows")
                    && err.contains(&allowed.display().to_string()),
                "a base outside the allowed one: {err}"
            );
            e.create("allowed", &[format!("base={}", allowed.display())])?;
            ensure!(e.run("allowed", "cat /x/f.txt")? == "allowed\n", "allowed");
            ensure!(
                e.plugin_log()?.contains("DEBUG"),
                "RUST_LOG=debug shows no debug line in the plugin's log"
            );
            e.docker(&["plugin", "disable", "-f", PLUGIN])?;
            e.docker(&[
                "plugin",
                "set",
                PLUGIN,
                "DOCKER_ON_TOP_ALLOWED_BASES=",
                "RUST_LOG=info",
            ])?;
            e.docker(&["plugin", "enable", PLUGIN])?;
            Ok(())
        },
    );

    report.step(
        "disable: refused while a volume is in use; disable -f and enable keep every volume and its changes",
        || {
            let e = the(&mut env)?;
            e.start("in-use", "cow")?;
            let err = e.docker_fails(&["plugin", "disable", PLUGIN])?;
            ensure!(err.contains("in use"), "disable while in use: {err}");
            ensure!(e.enabled()?, "the refused disable disabled the plugin");
            e.docker(&["rm", "-f", "in-use"])?;
            // dockerd counts a reference per volume of the driver, not per container: with
            // volumes present a plain disable stays refused.
            let err = e.docker_fails(&["plugin", "disable", PLUGIN])?;
            ensure!(err.contains("in use"), "disable with volumes: {err}");
            e.docker(&["plugin", "disable", "-f", PLUGIN])?;
            e.docker(&["plugin", "enable", PLUGIN])?;
            let volumes = e.docker(&["volume", "ls", "-q"])?;
            for v in ["switch", "cow", "shared", "volatile", "cp", "odd", "linked", "allowed"] {
                ensure!(
                    volumes.lines().any(|l| l == v),
                    "volume {v} is gone after disable and enable: {volumes:?}"
                );
            }
            let out = e.run("cow", "cat /x/a.txt /x/new.txt")?;
            ensure!(out == "changed\nnew\n", "after enable the volume shows {out:?}");
            Ok(())
        },
    );

    report.step(
        "disable -f while a container uses a volume: the container keeps it, and no second overlay is mounted on its upper",
        || {
            let e = the(&mut env)?;
            e.volume("forced", &[("f.txt", "base\n")], false)?;
            e.start("forced-a", "forced")?;
            e.exec("forced-a", "echo kept > /x/kept.txt")?;
            e.docker(&["plugin", "disable", "-f", PLUGIN])?;
            let seen = e.exec("forced-a", "cat /x/kept.txt && echo more > /x/more.txt")?;
            ensure!(seen == "kept\n", "the running container lost its volume: {seen:?}");
            // dockerd unmounted the propagated mount: only the container's copy is left.
            ensure!(
                !e.mounted("forced")?,
                "the overlay is still in the propagated mount after disable -f"
            );
            e.docker(&["plugin", "enable", PLUGIN])?;
            let second = run_cmd(
                e.docker.cmd().args([
                    "run", "--rm", "--network", "none", "-v", "forced:/x", IMAGE, "true",
                ]),
                TIMEOUT,
            )?;
            ensure!(
                !second.success() && second.stderr.contains("is still mounted by"),
                "a second container while the first holds its copy: {second:?}"
            );
            e.docker(&["rm", "-f", "forced-a"])?;
            ensure!(
                e.records("forced")?.is_empty(),
                "records after the container went: {:?}",
                e.records("forced")?
            );
            let out = e.run("forced", "cat /x/kept.txt /x/more.txt")?;
            ensure!(out == "kept\nmore\n", "after the container went: {out:?}");
            e.expect_unmounted("forced", "at the end")?;
            Ok(())
        },
    );

    report.step(
        "upgrade from the archive: disable -f, rm -f, create, enable; volumes and changes kept",
        || {
            let e = the(&mut env)?;
            let unpacked = e.sandbox.tmp.join("upgrade");
            fs::create_dir(&unpacked).ctx("creating the upgrade directory")?;
            run_ok(
                Command::new("tar")
                    .arg("-C")
                    .arg(&unpacked)
                    .arg("-xzf")
                    .arg(&e.tarball),
                TIMEOUT,
            )?;
            let old_id = e.id.clone();
            e.docker(&["plugin", "disable", "-f", PLUGIN])?;
            e.docker(&["plugin", "rm", "-f", PLUGIN])?;
            ensure!(
                !e.sandbox.tmp.join("data/plugins").join(&old_id).exists(),
                "plugin rm left the plugin's directory"
            );
            ensure!(
                e.upper("cow").join("new.txt").exists(),
                "plugin rm removed the volumes' state"
            );
            let bundle = unpacked.join("docker-on-top-plugin");
            e.docker(&["plugin", "create", PLUGIN, &bundle.to_string_lossy()])?;
            e.docker(&["plugin", "enable", PLUGIN])?;
            e.id = e
                .docker(&["plugin", "inspect", "-f", "{{.Id}}", PLUGIN])?
                .trim()
                .to_owned();
            let out = e.run("cow", "cat /x/a.txt /x/new.txt")?;
            ensure!(
                out == "changed\nnew\n",
                "after the upgrade the volume shows {out:?}"
            );
            let driver = e.docker(&["volume", "inspect", "-f", "{{.Driver}}", "odd"])?;
            ensure!(driver.trim() == DRIVER, "volume odd has driver {driver:?}");
            Ok(())
        },
    );

    report.step(
        "dockerd's bind of the propagated mount cut off from the plugin's: Mount refuses, the plugin stops, dockerd starts it again, the next run works",
        || {
            let e = the(&mut env)?;
            e.volume("cut", &[("base.txt", "base\n")], false)?;
            let before = e.plugin_pids();
            // dockerd's own bind of the propagated mount stops receiving the plugin's mounts:
            // they still reach dockerd's data root, under that bind, where dockerd does not
            // look.
            run_ok(
                e.sandbox.ns_command("mount").arg("--make-private").arg(e.propagated()),
                TIMEOUT,
            )?;
            let err = e.docker_fails(&[
                "run", "--rm", "--network", "none", "-v", "cut:/x", IMAGE, "sh", "-c", "ls /x",
            ])?;
            ensure!(err.contains(CUT_OFF), "docker run without the propagated mount: {err}");
            e.expect_unmounted("cut", "after the refused Mount")?;
            e.wait_restarted(&before)?;
            let log = e.plugin_log()?;
            ensure!(
                log.contains("stopped because dockerd no longer sees what is mounted in /mnt/volumes"),
                "the plugin did not log why it stopped"
            );
            let out = e.run("cut", "ls /x && echo new > /x/new.txt")?;
            ensure!(
                out == "base.txt\n",
                "after the plugin's restart a container saw {out:?}"
            );
            ensure!(
                fs::read_to_string(e.upper("cut").join("new.txt")).ctx("reading new.txt")? == "new\n",
                "the container's write is not in the volume's upper"
            );
            e.expect_unmounted("cut", "after the container went")?;
            e.docker(&["volume", "rm", "cut"])?;
            Ok(())
        },
    );

    report.step(
        "dockerd killed and started again: the plugin and its volumes come back, the forgotten mount is released",
        || {
            let e = the(&mut env)?;
            e.volume("restart", &[("base.txt", "base\n")], true)?;
            e.start("restart-a", "restart")?;
            e.exec("restart-a", "echo scratch > /x/scratch.txt")?;
            let saved = e.records("restart")?;
            ensure!(saved.len() == 1, "records while running: {saved:?}");
            let plugin_before = e.plugin_pids();
            e.kill9_dockerd()?;
            e.restart_dockerd(&[])?;
            let plugin_after = e.plugin_pids();
            ensure!(
                !plugin_after.is_empty() && plugin_after.is_disjoint(&plugin_before),
                "without --live-restore dockerd starts the plugin anew: processes {plugin_before:?}, then {plugin_after:?}"
            );
            ensure!(
                wait_until(Duration::from_secs(60), || e
                    .docker(&["inspect", "-f", "{{.State.Running}}", "restart-a"])
                    .is_ok_and(|s| s.trim() == "false")),
                "the old container still runs after dockerd's restart without live-restore"
            );
            ensure!(
                e.records("restart")? == saved,
                "dockerd sent the Unmount it is known to forget? records {:?}",
                e.records("restart")?
            );
            let out = e.ls_after_restart("restart")?;
            ensure!(
                out == "base.txt\n",
                "a new container saw {out:?}: the dead container's scratch file must be discarded"
            );
            e.expect_unmounted("restart", "after the new container exited")?;
            let log = e.plugin_log()?;
            ensure!(
                log.contains("voiding 1 stale mount record") || log.contains("released mount ID"),
                "the plugin did not log the release of the forgotten mount"
            );
            e.docker(&["start", "restart-a"])?;
            let out = e.exec("restart-a", "ls /x")?;
            ensure!(out == "base.txt\n", "the old container started again saw {out:?}");
            e.docker(&["rm", "-f", "restart-a"])?;
            e.expect_unmounted("restart", "after the old container went")?;
            let volumes = e.docker(&["volume", "ls", "-q"])?;
            ensure!(
                volumes.lines().any(|l| l == "cow"),
                "volumes after the restart: {volumes:?}"
            );
            Ok(())
        },
    );

    report.step(
        "with --live-restore: a container that stops while dockerd is down; the next Mount releases its forgotten record",
        || {
            let e = the(&mut env)?;
            e.sandbox.terminate(e.docker.pid, Duration::from_secs(60))?;
            e.restart_dockerd(&["--live-restore"])?;
            e.volume("live", &[("base.txt", "base\n")], true)?;
            e.start("live-a", "live")?;
            e.exec("live-a", "echo scratch > /x/scratch.txt")?;
            let container: u32 = e
                .docker(&["inspect", "-f", "{{.State.Pid}}", "live-a"])?
                .trim()
                .parse()
                .ctx("the container's pid")?;
            let plugin_before = e.plugin_pids();
            e.kill9_dockerd()?;
            // The container stops while dockerd is down: nobody sends its Unmount.
            kill(container, Signal::KILL);
            ensure!(
                wait_until(Duration::from_secs(30), || !Path::new(&format!("/proc/{container}")).exists()),
                "the container did not die"
            );
            ensure!(
                e.mounted("live")?,
                "the overlay is gone while dockerd is down (nothing unmounts it)"
            );
            e.restart_dockerd(&["--live-restore"])?;
            let plugin_after = e.plugin_pids();
            ensure!(
                !plugin_before.is_empty() && plugin_after == plugin_before,
                "with --live-restore the plugin should run on across the restart: processes {plugin_before:?}, then {plugin_after:?}"
            );
            // The overlay is still mounted on the record of the container that stopped.
            ensure!(
                e.mounted("live")? && e.records("live")?.len() == 1,
                "after the restart: mounted {}, records {:?}",
                e.mounted("live")?,
                e.records("live")?
            );
            // What the container saw is read from what it wrote into the volume, not from
            // `docker run`'s output: once in some 40 runs that output came back empty here, and
            // the file says what the container saw whatever the CLI got.
            e.run("live", "ls /x > /tmp/seen && cp /tmp/seen /x/seen.txt")?;
            let out = fs::read_to_string(e.upper("live").join("seen.txt")).ctx("reading seen.txt")?;
            ensure!(
                out == "base.txt\n",
                "a new container saw {out:?}: the stopped container's scratch file must be discarded"
            );
            e.expect_unmounted("live", "after the new container exited")?;
            ensure!(
                e.plugin_log()?.contains("released mount ID"),
                "the plugin did not log the release of the stopped container's mount"
            );
            e.docker(&["rm", "-f", "live-a"])?;
            Ok(())
        },
    );

    report.step(
        "plugin rm: the volumes' data stays on the host, where the admin commands find it",
        || {
            let e = the(&mut env)?;
            // The switch back to the service (README), first half.
            let volumes = e.docker(&["volume", "ls", "-q"])?;
            let volumes: Vec<&str> = volumes.lines().collect();
            forget_volumes(e, &volumes)?;
            e.docker(&["plugin", "disable", "-f", PLUGIN])?;
            e.docker(&["plugin", "rm", "-f", PLUGIN])?;
            let plugins = e.docker(&["plugin", "ls", "-q"])?;
            ensure!(plugins.trim().is_empty(), "plugins left: {plugins:?}");
            let ls = e.admin_ok(&["ls"])?;
            for v in [
                "cow", "shared", "volatile", "cp", "odd", "linked", "allowed", "restart",
            ] {
                ensure!(
                    ls.lines().any(|l| l.split_whitespace().next() == Some(v)),
                    "docker-on-top ls after plugin rm lacks {v}: {ls}"
                );
            }
            let changes = e.admin_ok(&["changes", "cow"])?;
            ensure!(
                changes.contains("C /a.txt") && changes.contains("A /new.txt"),
                "changes of cow after plugin rm: {changes:?}"
            );
            Ok(())
        },
    );

    report.step(
        "back to the host service: the managed plugin's volumes and changes work with it",
        || {
            let e = the(&mut env)?;
            let log = e.sandbox.tmp.join("service-again.log");
            let pid = e.sandbox.start_plugin(BIN, Path::new(STATE), &[], &log)?;
            expect_listed(e, &["switch", "cow", "restart"], PLUGIN)?;
            let out = e.run("switch", "cat /x/service.txt /x/plugin.txt")?;
            ensure!(
                out == "by-service\nby-plugin\n",
                "switch under the service again: {out:?}"
            );
            let out = e.run("cow", "cat /x/a.txt /x/new.txt")?;
            ensure!(out == "changed\nnew\n", "cow under the service: {out:?}");
            e.sandbox.terminate(pid, Duration::from_secs(30))?;
            Ok(())
        },
    );

    let mut warnings = Vec::new();
    if let Some(e) = env {
        if report.failed() {
            println!(
                "\n----- last 60 lines of dockerd's log -----\n{}",
                tail(&e.docker.log, 60)
            );
            println!("\n(full log: target/tmp/plugin/)");
        }
        warnings.extend(e.teardown());
    }
    if report.finish(&warnings) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
