//! Places the plugin's start-up and request code together in the binary (issue 6: idle
//! memory). The kernel maps 64 KiB of the binary around each page fault, so code that runs
//! at start-up, scattered over the whole `.text`, makes all of it resident; grouped, it
//! fills a few such windows. `link/hot-functions.txt` (written by `scripts/hot-functions`)
//! lists that code; rust-lld, rustc's default linker for x86_64 Linux since 1.90, places it
//! first. A name the binary no longer has is skipped, so a stale list costs memory, never
//! a failed build. Only the `docker-on-top` binary is ordered; tests link as usual.

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
    println!("cargo::rustc-link-arg-bin=docker-on-top=-Wl,-z,pack-relative-relocs");
}
