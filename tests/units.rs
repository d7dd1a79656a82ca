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
            "Documentation=https://github.com/kolayne/docker-on-top#readme\n",
            "Documentation=https://github.com/kolayne/docker-on-top#readme\n\
             Documentation=file:///usr/share/doc/docker-on-top/README.md\n",
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
        for sandboxing in [
            "PrivateMounts=",
            "ProtectSystem=",
            "ProtectHome=",
            "PrivateTmp=",
            "ReadOnlyPaths=",
            "InaccessiblePaths=",
            "TemporaryFileSystem=",
            "BindPaths=",
            "MountFlags=",
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
    let service =
        std::fs::read_to_string(dest.join("etc/systemd/system/docker-on-top.service")).unwrap();
    assert!(
        service
            .lines()
            .any(|l| l == "ExecStart=/opt/dot/bin/docker-on-top serve $DOCKER_ON_TOP_OPTS"),
        "{service}"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("etc/systemd/system/docker-on-top.socket")).unwrap(),
        read("docker-on-top.socket")
    );
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
    assert!(
        !dest
            .join("etc/systemd/system/docker-on-top.service")
            .exists()
    );
    assert!(state.is_dir(), "uninstall touched the state directory");
}
