//! Places the plugin's start-up and request code together in the binary (issue 6: idle
//! memory). The kernel maps 64 KiB of the binary around each page fault, so code that runs
//! at start-up, scattered over the whole `.text`, makes all of it resident; grouped, it
//! fills a few such windows. `link/hot-functions.txt` (written by `scripts/hot-functions`)
//! lists that code; rust-lld, rustc's default linker for x86_64 Linux since 1.90, places it
//! first (`DOCKER_ON_TOP_NO_ORDER=1` leaves it out, for another linker). A name the binary no
//! longer has is skipped, so a stale list costs memory, never a failed build. Only the
//! `docker-on-top` binary is ordered; tests link as usual.

fn main() {
    let list = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("link/hot-functions.txt");
    println!("cargo::rerun-if-changed={}", list.display());
    println!("cargo::rerun-if-env-changed=DOCKER_ON_TOP_NO_ORDER");
    let target = std::env::var("TARGET").unwrap_or_default();
    // Another target's linker may be GNU ld, which has no such option; and anyone linking
    // with another linker can turn it off.
    if target != "x86_64-unknown-linux-gnu" || std::env::var_os("DOCKER_ON_TOP_NO_ORDER").is_some()
    {
        return;
    }
    println!(
        "cargo::rustc-link-arg-bin=docker-on-top=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    println!("cargo::rustc-link-arg-bin=docker-on-top=-Wl,--no-warn-symbol-ordering");
    // Relative relocations packed (DT_RELR): 50 KiB fewer for the loader to read at start.
    // glibc runs such a binary from 2.36 on; the build machine's glibc is the one it links.
    if glibc_at_least(2, 36) {
        println!("cargo::rustc-link-arg-bin=docker-on-top=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether this machine's glibc (`getconf GNU_LIBC_VERSION`: "glibc 2.36") is that recent.
fn glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(out) = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = (text.trim().strip_prefix("glibc "))
        .unwrap_or_default()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    version >= (major, minor)
}
