//! The systemd units and the ways they are installed agree (issue 7). Proven under a real
//! systemd by `tests/systemd.rs`; these are the cheap checks of the files themselves.

use std::path::Path;
use std::process::Command;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const UPSTREAM_EXEC: &str = "ExecStart=/usr/local/bin/docker-on-top serve $DOCKER_ON_TOP_OPTS";

#[test]
fn the_package_unit_is_the_root_unit_with_its_own_paths() {
    let root = read("docker-on-top.service");
    let package = read("debian/docker-on-top.service");
    assert!(root.lines().any(|l| l == UPSTREAM_EXEC), "{root}");
    let expected = root
        .replace(
            UPSTREAM_EXEC,
            "ExecStart=/usr/bin/docker-on-top serve $DOCKER_ON_TOP_OPTS",
        )
        .replace(
            "Documentation=file:///usr/local/share/doc/docker-on-top/README.md\n",
            "Documentation=file:///usr/share/doc/docker-on-top/README.md\n",
        );
    assert_eq!(
        package, expected,
        "debian/docker-on-top.service must be docker-on-top.service with the package's paths"
    );
}

#[test]
fn units_are_ordered_before_dockerd_documented_and_unsandboxed() {
    for unit in ["docker-on-top.socket", "docker-on-top.service"] {
        let text = read(unit);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"Before=docker.service"), "{unit}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("Documentation=https://")),
            "{unit}"
        );
        // Each of these gives the service a mount namespace of its own (systemd.exec(5); newer
        // systemd for PrivateNetwork= and PrivateIPC=), or, PrivateUsers=, takes CAP_SYS_ADMIN
        // over the host's mounts.
        for sandboxing in [
            "PrivateMounts=",
            "ProtectSystem=",
            "ProtectHome=",
            "PrivateTmp=",
            "ReadOnlyPaths=",
            "ReadWritePaths=",
            "InaccessiblePaths=",
            "ExecPaths=",
            "NoExecPaths=",
            "TemporaryFileSystem=",
            "BindPaths=",
            "BindReadOnlyPaths=",
            "MountFlags=",
            "MountImages=",
            "ExtensionImages=",
            "ExtensionDirectories=",
            "RootDirectory=",
            "RootImage=",
            "PrivateDevices=",
            "PrivateNetwork=",
            "PrivateIPC=",
            "PrivatePIDs=",
            "PrivateUsers=",
            "DynamicUser=",
            "ProtectKernelTunables=",
            "ProtectKernelModules=",
            "ProtectKernelLogs=",
            "ProtectControlGroups=",
            "ProtectProc=",
            "ProcSubset=",
            "LogNamespace=",
        ] {
            assert!(
                !lines.iter().any(|l| l.starts_with(sandboxing)),
                "{unit} has {sandboxing}: its mounts would be invisible to dockerd"
            );
        }
    }
    let socket = read("docker-on-top.socket");
    assert!(socket.contains("ListenStream=/run/docker/plugins/docker-on-top.sock\n"));
    assert!(socket.contains("SocketMode=0660\n") && socket.contains("SocketUser=root\n"));
    let service = read("docker-on-top.service");
    assert!(
        service.contains("Type=notify\n") && service.contains("Requires=docker-on-top.socket\n")
    );
    // Socket-activated: enabling the service enables the socket, never an eager start.
    assert!(
        !service.contains("WantedBy="),
        "the service must not start at boot by itself"
    );
}

/// The hardening that needs no mount namespace (issue 15); tests/systemd.rs proves the plugin
/// works with it under a real systemd.
#[test]
fn the_service_is_hardened_with_exactly_the_capabilities_it_uses() {
    let service = read("docker-on-top.service");
    let lines: Vec<&str> = service.lines().collect();
    let mut caps: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .flat_map(str::split_whitespace)
        .collect();
    caps.sort_unstable();
    assert_eq!(
        caps,
        [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_MKNOD",
            "CAP_SETFCAP",
            "CAP_SYS_ADMIN",
            "CAP_SYS_PTRACE",
        ]
    );
    for directive in [
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX",
        "IPAddressDeny=any",
        "RestrictNamespaces=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service @mount",
        "SystemCallErrorNumber=EPERM",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "RestrictRealtime=yes",
        "ProtectHostname=yes",
        "ProtectClock=yes",
        "UMask=0077",
    ] {
        assert!(lines.contains(&directive), "the service lacks {directive}");
    }
    // An upper root takes its base's mode, set-group-ID bit included.
    assert!(!lines.iter().any(|l| l.starts_with("RestrictSUIDSGID=")));
}

#[test]
fn make_install_follows_prefix_and_destdir() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path();
    let out = Command::new("make")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("install")
        .arg(format!("DESTDIR={}", dest.display()))
        .arg("PREFIX=/opt/dot")
        .arg(format!("BIN={}", env!("CARGO_BIN_EXE_docker-on-top")))
        .output()
        .expect("cannot run make (Debian package make; scripts/test installs it)");
    assert!(
        out.status.success(),
        "make install failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dest.join("opt/dot/bin/docker-on-top").is_file());
    // Units under PREFIX (/etc/systemd/system is the administrator's).
    let units = dest.join("opt/dot/lib/systemd/system");
    assert!(!dest.join("etc").exists(), "make install wrote into /etc");
    let service = std::fs::read_to_string(units.join("docker-on-top.service")).unwrap();
    assert!(
        service
            .lines()
            .any(|l| l == "ExecStart=/opt/dot/bin/docker-on-top serve $DOCKER_ON_TOP_OPTS"),
        "{service}"
    );
    assert!(
        service
            .lines()
            .any(|l| l == "Documentation=file:///opt/dot/share/doc/docker-on-top/README.md"),
        "{service}"
    );
    let readme = dest.join("opt/dot/share/doc/docker-on-top/README.md");
    assert_eq!(std::fs::read_to_string(&readme).unwrap(), read("README.md"));
    assert_eq!(
        std::fs::read_to_string(units.join("docker-on-top.socket")).unwrap(),
        read("docker-on-top.socket")
    );
    // The man pages and the completions, as dist/ has them; the main page's SEE ALSO names
    // the README where it was installed.
    let man = dest.join("opt/dot/share/man/man8");
    for page in ["docker-on-top-serve.8", "docker-on-top-commit.8"] {
        assert_eq!(
            std::fs::read_to_string(man.join(page)).unwrap(),
            read(&format!("dist/man/{page}"))
        );
    }
    let main_page = read("dist/man/docker-on-top.8");
    assert!(main_page.contains("/usr/share/doc/docker-on-top/README.md"));
    assert_eq!(
        std::fs::read_to_string(man.join("docker-on-top.8")).unwrap(),
        main_page.replace(
            "/usr/share/doc/docker-on-top/README.md",
            "/opt/dot/share/doc/docker-on-top/README.md"
        )
    );
    for (installed, source) in [
        (
            "bash-completion/completions/docker-on-top",
            "docker-on-top.bash",
        ),
        ("zsh/site-functions/_docker-on-top", "_docker-on-top"),
        (
            "fish/vendor_completions.d/docker-on-top.fish",
            "docker-on-top.fish",
        ),
    ] {
        assert_eq!(
            std::fs::read_to_string(dest.join("opt/dot/share").join(installed)).unwrap(),
            read(&format!("dist/completions/{source}")),
            "{installed}"
        );
    }
    // With DESTDIR nothing runs systemctl.
    assert!(String::from_utf8_lossy(&out.stdout).contains("not running systemctl"));

    let state = dest.join("var/lib/docker-on-top");
    std::fs::create_dir_all(&state).unwrap();
    let out = Command::new("make")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("uninstall")
        .arg(format!("DESTDIR={}", dest.display()))
        .arg("PREFIX=/opt/dot")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept /var/lib/docker-on-top"));
    assert!(!dest.join("opt/dot/bin/docker-on-top").exists());
    assert!(!dest.join("opt/dot/share/doc/docker-on-top").exists());
    // Exactly what install installed is gone: no file is left (directories it may have
    // made, such as share/man/man8, stay: others use them too).
    let left: Vec<_> = walk(dest).into_iter().filter(|p| !p.is_dir()).collect();
    assert!(left.is_empty(), "make uninstall left {left:?}");
    assert!(state.is_dir(), "uninstall touched the state directory");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// dist/man and dist/completions are what `docker-on-top generate` writes now: regenerate
/// them with `make generated` after changing the command line.
#[test]
fn the_man_pages_and_completions_in_dist_are_current() {
    let tmp = tempfile::tempdir().unwrap();
    for (what, dir) in [("man", "dist/man"), ("completions", "dist/completions")] {
        let out = tmp.path().join(what);
        std::fs::create_dir(&out).unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_docker-on-top"))
            .args(["generate", what])
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "generate {what}");
        let names = |d: &Path| {
            let mut v: Vec<String> = (std::fs::read_dir(d).unwrap())
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        assert_eq!(
            names(&out),
            names(&committed),
            "{dir}: run `make generated`"
        );
        for name in names(&out) {
            assert_eq!(
                std::fs::read_to_string(out.join(&name)).unwrap(),
                read(&format!("{dir}/{name}")),
                "{dir}/{name} is stale: run `make generated`"
            );
        }
    }
    // The exit statuses are in the man page.
    let page = read("dist/man/docker-on-top.8");
    assert!(page.contains(".SH \"EXIT STATUS\"") && page.contains("no such volume"));
}

/// The bash completion completes a subcommand's options and the top level's commands, run by
/// bash as bash-completion calls it.
#[test]
fn the_bash_completion_completes_after_a_subcommand() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/completions/docker-on-top.bash");
    let complete = |line: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(
                r#"source "$1"; read -ra COMP_WORDS <<< "$2"; [[ "$2" == *" " ]] && COMP_WORDS+=("");
                   COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMP_LINE="$2"; COMP_POINT=${#2};
                   _docker__on__top docker-on-top "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}";
                   printf '%s\n' "${COMPREPLY[@]}""#,
            )
            .arg("bash")
            .arg(&script)
            .arg(line)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let ls = complete("docker-on-top ls --");
    assert!(ls.lines().any(|w| w == "--json"), "ls --<TAB>: {ls:?}");
    let commit = complete("docker-on-top commit --");
    assert!(
        commit.lines().any(|w| w == "--yes"),
        "commit --<TAB>: {commit:?}"
    );
    let top = complete("docker-on-top ");
    for command in [
        "ls", "inspect", "changes", "recover", "export", "reset", "commit",
    ] {
        assert!(top.lines().any(|w| w == command), "<TAB>: {top:?}");
    }
    // What --help hides, completion does not offer: `generate`, the top level's copies of the
    // serve options, serve's --read-timeout.
    assert!(!top.lines().any(|w| w == "generate"), "<TAB>: {top:?}");
    let top_options = complete("docker-on-top --");
    assert!(
        top_options.lines().any(|w| w == "--root"),
        "{top_options:?}"
    );
    assert!(
        !top_options.lines().any(|w| w == "--socket"),
        "{top_options:?}"
    );
    let serve = complete("docker-on-top serve --");
    assert!(serve.lines().any(|w| w == "--idle-timeout"), "{serve:?}");
    assert!(!serve.lines().any(|w| w == "--read-timeout"), "{serve:?}");
    for script in ["_docker-on-top", "docker-on-top.fish"] {
        let text = read(&format!("dist/completions/{script}"));
        assert!(
            !text.contains("read-timeout") && !text.contains("generate"),
            "{script} offers hidden items"
        );
    }
}
