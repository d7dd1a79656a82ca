//! docker-on-top driven by Debian's Podman (issue 7).
//!
//! Podman speaks Docker's volume plugin protocol to the plugins listed in
//! `[engine.volume_plugins]` of containers.conf; it never calls Capabilities, gives every call
//! 5 s, can parse only JSON errors and uses the container ID as the mount ID.
//!
//! Isolation (see `tests/common/host.rs`): the plugin runs in a private mount namespace with its
//! own `--root` under a temporary directory, on its default socket in a private tmpfs on
//! /run/docker/plugins; every podman command runs in that namespace too (`nsenter`), where a
//! private tmpfs on /etc/containers/containers.conf.d holds the package's drop-in
//! (dist/podman/50-docker-on-top.conf, verbatim: so the plugin is registered exactly as
//! `apt install` registers it) and the test's own settings (cgroupfs, a file events log, ulimits
//! the host allows); private `--root`, `--runroot` and `--tmpdir` storage and the vfs storage
//! driver, and a busybox image made with `podman import`. Nothing touches the host's Podman
//! storage, and the overlays vanish with the namespace.
//!
//! Steps: create (and a refused create with its message), run (reads the base, writes; the
//! base is unchanged; a second container sees the change), two containers at once (one mount
//! per container ID), volatile discard, remove — and nothing is left mounted or recorded.

#[path = "common/host.rs"]
mod host;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use host::{Context, Report, Res, Sandbox, ensure, run_cmd, run_ok, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_docker-on-top");
const IMAGE: &str = "localhost/dot-podman-busybox:latest";
const TIMEOUT: Duration = Duration::from_secs(120);
const LONG_RUNNING: &str = "trap 'exit 0' TERM INT; while :; do sleep 1 & wait $!; done";

struct Podman {
    sandbox: Sandbox,
    root: PathBuf,
    bases: PathBuf,
    plugin_log: PathBuf,
    plugin_pid: u32,
}

impl Podman {
    fn cmd(&self) -> Command {
        let t = &self.sandbox.tmp;
        let mut cmd = self.sandbox.ns_command("podman");
        // No CONTAINERS_CONF: with it, Podman would read no drop-in.
        cmd.env_remove("CONTAINERS_CONF")
            .env_remove("CONTAINER_HOST")
            .env_remove("CONTAINER_CONNECTION")
            .arg("--root")
            .arg(t.join("storage"))
            .arg("--runroot")
            .arg(t.join("runroot"))
            .arg("--tmpdir")
            .arg(t.join("libpod-tmp"))
            .arg("--storage-driver")
            .arg("vfs");
        cmd
    }

    /// `podman ARGS`, which must succeed; returns its stdout. Containers (`run`) go into the
    /// sandbox's cgroup parent, where the teardown finds and kills them.
    fn ok(&self, args: &[&str]) -> Res<String> {
        let mut cmd = self.cmd();
        match args.split_first() {
            Some((&"run", rest)) => cmd
                .arg("run")
                .arg("--cgroup-parent")
                .arg(&self.sandbox.cgroup_parent)
                .args(rest),
            _ => cmd.args(args),
        };
        run_ok(&mut cmd, TIMEOUT)
    }

    /// `podman ARGS`, which must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> Res<String> {
        let out = run_cmd(self.cmd().args(args), TIMEOUT)?;
        ensure!(
            !out.success(),
            "`podman {}` succeeded but should have failed",
            args.join(" ")
        );
        Ok(out.stderr)
    }

    fn run(&self, volume: &str, script: &str) -> Res<String> {
        let mount = format!("{volume}:/d");
        self.ok(&[
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

    fn base(&self, name: &str, files: &[(&str, &str)]) -> Res<PathBuf> {
        host::make_tree(&self.bases.join(name), files)
    }

    /// Whether the volume's overlay is mounted in the namespace.
    fn mounted(&self, volume: &str) -> Res<bool> {
        let mountpoint = self.root.join(volume).join("mountpoint");
        let info = fs::read_to_string(format!("/proc/{}/mountinfo", self.sandbox.anchor_pid))
            .ctx("reading the namespace's mountinfo")?;
        Ok(info
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(mountpoint.to_str().unwrap_or(""))))
    }

    fn records(&self, volume: &str) -> Res<Vec<String>> {
        Ok(host::mount_records(&self.root.join(volume))?
            .into_keys()
            .collect())
    }

    fn plugin_alive(&mut self) -> Res {
        if let Some(status) = self.sandbox.exited(self.plugin_pid) {
            return Err(format!(
                "the plugin exited ({status}): {}",
                host::tail(&self.plugin_log, 20)
            ));
        }
        Ok(())
    }
}

fn setup() -> Res<Podman> {
    host::require_programs(&[
        ("podman", "podman"),
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("tar", "tar"),
    ])?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or("no /bin/busybox: install Debian's busybox-static (scripts/test does)")?;
    let mut sandbox = Sandbox::new(
        "podman",
        &["/etc/containers/containers.conf.d", "/run/docker/plugins"],
    )?;
    let t = sandbox.tmp.clone();
    let root = t.join("state");
    let socket = PathBuf::from(host::PLUGIN_SOCKET);
    let plugin_log = t.join("plugin.log");
    for d in [
        "bases",
        "storage",
        "runroot",
        "libpod-tmp",
        "image/bin",
        "image/tmp",
    ] {
        fs::create_dir_all(t.join(d)).ctx(format!("creating {d}"))?;
    }
    // The host lacks CAP_SYS_RESOURCE: Podman's default (raise nofile and nproc to the
    // maximum) is refused there, so ask for limits anyone may set.
    // Debian's Podman 4.3 reads /etc/containers/containers.conf.d (not yet
    // /usr/share/containers/containers.conf.d), in name order.
    let drop_ins = sandbox.ns_path("/etc/containers/containers.conf.d");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/podman/50-docker-on-top.conf"),
        drop_ins.join("50-docker-on-top.conf"),
    )
    .ctx("copying the package's containers.conf drop-in")?;
    fs::write(
        drop_ins.join("00-dot-test.conf"),
        format!(
            r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{events}"
"#,
            events = t.join("events.log").display(),
        ),
    )
    .ctx("writing the test's containers.conf drop-in")?;

    let mut cmd = sandbox.ns_command(BIN);
    cmd.arg("--root")
        .arg(&root)
        .arg("--socket")
        .arg(&socket)
        .env("RUST_LOG", "info,docker_on_top=debug");
    for var in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "NOTIFY_SOCKET",
        "JOURNAL_STREAM",
    ] {
        cmd.env_remove(var);
    }
    let plugin_pid = sandbox.spawn(&mut cmd, &plugin_log)?;
    let sock_in_ns = PathBuf::from(format!(
        "/proc/{}/root{}",
        sandbox.anchor_pid,
        socket.display()
    ));
    ensure!(
        wait_until(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock_in_ns).is_ok()
        }),
        "the plugin did not serve within 20 s: {}",
        host::tail(&plugin_log, 20)
    );

    let podman = Podman {
        sandbox,
        root,
        bases: t.join("bases"),
        plugin_log,
        plugin_pid,
    };
    // A busybox image, imported locally (no registry).
    let image = t.join("image");
    fs::copy(&busybox, image.join("bin/busybox")).ctx("copying busybox")?;
    let list = run_ok(Command::new(&busybox).arg("--list"), TIMEOUT)?;
    for applet in list.lines().map(str::trim) {
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            symlink("busybox", image.join("bin").join(applet)).ctx(format!("linking {applet}"))?;
        }
    }
    let tar = t.join("image.tar");
    run_ok(
        Command::new("tar")
            .arg("--numeric-owner")
            .arg("-C")
            .arg(&image)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        TIMEOUT,
    )?;
    podman.ok(&["import", &tar.to_string_lossy(), IMAGE])?;
    let hello = podman.ok(&["run", "--rm", "--network", "none", IMAGE, "echo", "hello"])?;
    ensure!(
        hello == "hello\n",
        "the test image does not work: {hello:?}"
    );
    Ok(podman)
}

fn create(p: &Podman, name: &str, base: &Path, volatile: bool) -> Res {
    p.ok(&[
        "volume",
        "create",
        "--driver",
        "docker-on-top",
        "-o",
        &format!("base={}", base.display()),
        "-o",
        &format!("volatile={volatile}"),
        name,
    ])
    .map(drop)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("podman_end_to_end: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty()
        && !filters
            .iter()
            .any(|f| "podman_end_to_end".contains(f.as_str()))
    {
        println!("podman: not selected\n0 passed, 0 failed");
        return ExitCode::SUCCESS;
    }
    let mut report = Report::new("podman");
    let mut podman: Option<Podman> = None;
    report.step("setup: plugin, private podman, busybox image", || {
        podman = Some(setup()?);
        Ok(())
    });
    let p = || podman.as_ref().ok_or_else(|| "no podman".to_owned());

    report.step(
        "create: driver options reach the plugin; errors are readable",
        || {
            let p = p()?;
            let base = p.base("data", &[("f.txt", "base\n")])?;
            create(p, "data", &base, false)?;
            ensure!(
                p.root.join("data/metadata.json").is_file(),
                "the plugin has no volume `data`"
            );
            let inspect = p.ok(&[
                "volume",
                "inspect",
                "--format",
                "{{.Driver}} {{.Status.Base}}",
                "data",
            ])?;
            ensure!(
                inspect.trim() == format!("docker-on-top {}", base.display()),
                "podman volume inspect: {inspect:?}"
            );
            let err = p.fails(&[
                "volume",
                "create",
                "--driver",
                "docker-on-top",
                "-o",
                "color=red",
                "bad",
            ])?;
            ensure!(
                err.contains("unknown option \"color\"; valid options are: base, volatile"),
                "podman did not show the plugin's error: {err:?}"
            );
            let missing = p.bases.join("missing");
            let err = p.fails(&[
                "volume",
                "create",
                "--driver",
                "docker-on-top",
                "-o",
                &format!("base={}", missing.display()),
                "bad",
            ])?;
            ensure!(
                err.contains("cannot be used") && err.contains("missing"),
                "podman did not show the plugin's error: {err:?}"
            );
            ensure!(!p.root.join("bad").exists(), "a refused volume was created");
            Ok(())
        },
    );

    report.step(
        "run: reads the base, writes to the upper; the base is unchanged",
        || {
            let p = p()?;
            let out = p.run(
                "data",
                "cat /d/f.txt; echo changed > /d/f.txt; echo new > /d/new.txt",
            )?;
            ensure!(out == "base\n", "the container read {out:?}");
            let out = p.run("data", "cat /d/f.txt /d/new.txt")?;
            ensure!(out == "changed\nnew\n", "a second container read {out:?}");
            let base = p.bases.join("data");
            ensure!(
                fs::read_to_string(base.join("f.txt")).ctx("reading the base")? == "base\n"
                    && !base.join("new.txt").exists(),
                "the base was changed"
            );
            ensure!(
                fs::read_to_string(p.root.join("data/upper/new.txt")).ctx("reading the upper")?
                    == "new\n",
                "the upper does not hold the change"
            );
            // Podman's last Unmount may trail the container's end by a moment.
            ensure!(
                wait_until(Duration::from_secs(10), || p
                    .mounted("data")
                    .is_ok_and(|m| !m)),
                "still mounted after the containers ended"
            );
            ensure!(
                p.records("data")?.is_empty(),
                "mount records left: {:?}",
                p.records("data")?
            );
            Ok(())
        },
    );

    report.step(
        "two containers at once share one mount; unmounted after the last",
        || {
            let p = p()?;
            let mut ids = Vec::new();
            for name in ["c1", "c2"] {
                let id = p.ok(&[
                    "run",
                    "-d",
                    "--network",
                    "none",
                    "--name",
                    name,
                    "-v",
                    "data:/d",
                    IMAGE,
                    "sh",
                    "-c",
                    LONG_RUNNING,
                ])?;
                ids.push(id.trim().to_owned());
            }
            // Podman counts the containers of a volume itself: it sends Mount for the first and
            // Unmount after the last, always with one fixed mount ID (Debian's podman 4.3 does
            // not use the container ID). The plugin sees one use.
            let records = p.records("data")?;
            ensure!(
                records.len() == 1 && !ids.contains(&records[0]),
                "mount records {records:?} for containers {ids:?}"
            );
            p.ok(&["exec", "c1", "sh", "-c", "echo shared > /d/shared.txt"])?;
            let seen = p.ok(&["exec", "c2", "cat", "/d/shared.txt"])?;
            ensure!(seen == "shared\n", "c2 saw {seen:?}");
            p.ok(&["stop", "-t", "5", "c1"])?;
            ensure!(p.mounted("data")?, "unmounted while c2 still runs");
            p.ok(&["rm", "-f", "c1", "c2"])?;
            ensure!(
                wait_until(Duration::from_secs(10), || p
                    .mounted("data")
                    .is_ok_and(|m| !m)),
                "still mounted after both containers were removed"
            );
            ensure!(
                p.records("data")?.is_empty(),
                "mount records left: {:?}",
                p.records("data")?
            );
            Ok(())
        },
    );

    report.step("volatile: changes are discarded at the next mount", || {
        let p = p()?;
        let base = p.base("scratch", &[("f.txt", "base\n")])?;
        create(p, "scratch", &base, true)?;
        let out = p.run("scratch", "echo x > /d/x.txt; cat /d/f.txt")?;
        ensure!(out == "base\n", "the container read {out:?}");
        ensure!(
            p.root.join("scratch/upper/x.txt").is_file(),
            "the change is not in the upper between the containers"
        );
        let out = p.run("scratch", "ls /d")?;
        ensure!(out == "f.txt\n", "the next container saw {out:?}");
        Ok(())
    });

    report.step(
        "remove: podman volume rm removes the plugin's volume",
        || {
            let p = p()?;
            p.ok(&["volume", "rm", "data", "scratch"])?;
            for v in ["data", "scratch"] {
                ensure!(
                    !p.root.join(v).exists(),
                    "volume {v} is still in the state directory"
                );
            }
            let listed = p.ok(&["volume", "ls", "--format", "{{.Name}}"])?;
            ensure!(listed.trim().is_empty(), "podman still lists {listed:?}");
            ensure!(
                fs::read_to_string(p.bases.join("data/f.txt")).ctx("reading the base")? == "base\n",
                "removing the volume changed the base"
            );
            Ok(())
        },
    );

    let mut warnings = Vec::new();
    if let Some(mut p) = podman {
        if let Err(e) = p.plugin_alive() {
            warnings.push(e);
        }
        let _ = fs::create_dir_all(Path::new(env!("CARGO_TARGET_TMPDIR")).join("podman"));
        let _ = fs::copy(
            &p.plugin_log,
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("podman/plugin.log"),
        );
        let _ = run_cmd(p.cmd().args(["rm", "-af", "-t", "2"]), TIMEOUT);
        if report.failed() {
            println!(
                "\n----- last 40 lines of the plugin's log -----\n{}",
                host::tail(&p.plugin_log, 40)
            );
        }
        warnings.extend(p.sandbox.destroy());
    }
    if report.finish(&warnings) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
