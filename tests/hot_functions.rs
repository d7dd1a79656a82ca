//! The list of start-up and request code that build.rs has the linker place together
//! (`link/hot-functions.txt`) still covers what the release binary runs (issue 6: idle
//! memory under 3 MiB depends on it). Profiles the release binary under valgrind, as root:
//! `scripts/test` builds it first (`cargo deb`) and installs valgrind.

use std::path::Path;
use std::process::Command;

#[test]
fn the_hot_function_list_covers_what_the_release_binary_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = root.join("target/release/docker-on-top");
    assert!(
        binary.exists(),
        "{} is missing: build it first (`cargo build --release`; scripts/test does)",
        binary.display()
    );
    let out = Command::new(root.join("scripts/hot-functions"))
        .arg("--check")
        .output()
        .expect("cannot run scripts/hot-functions");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert!(report.contains("functions ran"), "{report}");
}
