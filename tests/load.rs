//! Load (issue 5, item 5): 64 clients mount and unmount the same and different volumes for a
//! sustained period against the real daemon, each over its own keep-alive connection as
//! dockerd holds them, with real overlay mounts in a private mount namespace.
//!
//! Every client mixes: the two volumes all clients share (one persistent, one volatile), one
//! of eight volumes shared by eight clients each, and a volume of its own; fresh mount IDs and
//! IDs mounted twice (as `docker cp` does); up to three mounts held at once. While it holds a
//! mount it checks the overlay is there and that a file it wrote is still there (no unmount
//! or volatile discard under a user). At the end: no error, every count exactly zero, nothing
//! mounted, the daemon's descriptors back to their number before, no stray files, and every
//! file written to a persistent volume in its upper.
//!
//! `DOT_SOAK_SECS` sets the duration (default 15 s; e.g. `DOT_SOAK_SECS=600` for a soak).
//! The throughput and latencies are printed (`--nocapture`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::daemon::{Conn, Env, dockerd_body, wait_until};
use serde_json::{Value, json};

const CLIENTS: usize = 64;
const GROUPS: usize = 8;
/// statfs(2) magic of overlayfs.
const OVERLAYFS_SUPER_MAGIC: u64 = 0x794c_7630;

fn soak_secs() -> u64 {
    std::env::var("DOT_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list the daemon's descriptors: {e}"))
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A tiny deterministic generator per client (xorshift), so a failure names a reproducible
/// sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One volume a client uses, and whether writes to it must survive.
#[derive(Clone)]
struct Volume {
    name: String,
    persistent: bool,
}

/// A mount a client holds: the volume, its ID, how many times it mounted that ID, and the
/// file it wrote there.
struct Held {
    volume: Volume,
    id: String,
    uses: u32,
    file: PathBuf,
}

#[derive(Default)]
struct Stats {
    mounts: Vec<Duration>,
    unmounts: Vec<Duration>,
    errors: Vec<String>,
    /// Files written to persistent volumes: (volume, file name).
    written: Vec<(String, String)>,
}

struct Client<'a> {
    env: &'a Env,
    conn: Conn,
    rng: Rng,
    me: usize,
    stats: Stats,
}

impl Client<'_> {
    fn call(&mut self, endpoint: &str, args: Value) -> Result<Value, String> {
        let body = dockerd_body(Some(&args));
        self.conn
            .request("POST", endpoint, Some(&body))
            .outcome()
            .map_err(|e| format!("{endpoint} {args}: {e}"))
    }

    fn mountpoint_seen(&self, volume: &str) -> PathBuf {
        self.env.seen(&self.env.mountpoint(volume))
    }

    fn check_mounted(&mut self, volume: &str, when: &str) -> bool {
        let mp = self.mountpoint_seen(volume);
        match rustix::fs::statfs(&mp) {
            Ok(fs) if u64::try_from(fs.f_type).ok() == Some(OVERLAYFS_SUPER_MAGIC) => true,
            Ok(fs) => {
                self.stats.errors.push(format!(
                    "client {}: {volume} is not an overlay {when} (f_type {:#x})",
                    self.me, fs.f_type
                ));
                false
            }
            Err(e) => {
                self.stats
                    .errors
                    .push(format!("client {}: statfs {mp:?} {when}: {e}", self.me));
                false
            }
        }
    }

    fn mount(&mut self, volume: &Volume, id: &str) -> bool {
        let t = Instant::now();
        let r = self.call(
            "/VolumeDriver.Mount",
            json!({ "Name": volume.name, "ID": id }),
        );
        self.stats.mounts.push(t.elapsed());
        match r {
            Ok(body) => {
                let want = self.env.mountpoint(&volume.name);
                if body["Mountpoint"].as_str() != want.to_str() {
                    self.stats
                        .errors
                        .push(format!("client {}: Mount {}: {body}", self.me, volume.name));
                }
                self.check_mounted(&volume.name, "after Mount")
            }
            Err(e) => {
                self.stats.errors.push(format!("client {}: {e}", self.me));
                false
            }
        }
    }

    fn unmount(&mut self, volume: &Volume, id: &str) {
        let t = Instant::now();
        let r = self.call(
            "/VolumeDriver.Unmount",
            json!({ "Name": volume.name, "ID": id }),
        );
        self.stats.unmounts.push(t.elapsed());
        if let Err(e) = r {
            self.stats.errors.push(format!("client {}: {e}", self.me));
        }
    }

    /// Mounts `volume` with a new ID (sometimes twice, as `docker cp` does) and writes a file
    /// in it.
    fn take(&mut self, volume: &Volume, n: u64) -> Option<Held> {
        let id = format!("c{}-{n}", self.me);
        if !self.mount(volume, &id) {
            return None;
        }
        let mut uses = 1;
        if self.rng.below(4) == 0 && self.mount(volume, &id) {
            uses = 2;
        }
        let name = format!("c{}-{n}", self.me);
        let file = self.mountpoint_seen(&volume.name).join(&name);
        if let Err(e) = std::fs::write(&file, &name) {
            self.stats.errors.push(format!(
                "client {}: writing {file:?} in {}: {e}",
                self.me, volume.name
            ));
        } else if volume.persistent {
            self.stats.written.push((volume.name.clone(), name));
        }
        Some(Held {
            volume: volume.clone(),
            id,
            uses,
            file,
        })
    }

    /// Checks the mount is still there with the file, then unmounts it (as often as mounted).
    fn release(&mut self, held: Held) {
        if self.check_mounted(&held.volume.name, "while held") {
            match std::fs::read_to_string(&held.file) {
                Ok(text) if held.file.ends_with(&text) => {}
                other => self.stats.errors.push(format!(
                    "client {}: {:?} in {} while held: {other:?} (unmounted or discarded under a user?)",
                    self.me, held.file, held.volume.name
                )),
            }
        }
        for _ in 0..held.uses {
            self.unmount(&held.volume, &held.id);
        }
    }
}

#[test]
fn sixty_four_clients_mount_and_unmount_without_error_or_leak() {
    let mut env = Env::new();
    env.start(&[]);
    let pid = env.daemon().pid();
    let base = env.dir.join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(base.join("base.txt"), "base").unwrap();

    let shared_p = Volume {
        name: "shared-p".into(),
        persistent: true,
    };
    let shared_v = Volume {
        name: "shared-v".into(),
        persistent: false,
    };
    let groups: Vec<Volume> = (0..GROUPS)
        .map(|g| Volume {
            name: format!("group-{g}"),
            persistent: g % 2 == 0,
        })
        .collect();
    let own: Vec<Volume> = (0..CLIENTS)
        .map(|c| Volume {
            name: format!("own-{c}"),
            persistent: c % 2 == 0,
        })
        .collect();
    let all: Vec<Volume> = [shared_p.clone(), shared_v.clone()]
        .into_iter()
        .chain(groups.iter().cloned())
        .chain(own.iter().cloned())
        .collect();
    for v in &all {
        env.create_ok(&v.name, &base, !v.persistent);
    }
    let fds_before = fd_count(pid);
    let secs = soak_secs();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let results = Mutex::new(Vec::new());

    let started = Instant::now();
    thread::scope(|scope| {
        for me in 0..CLIENTS {
            let (env, results) = (&env, &results);
            let choices = [
                shared_p.clone(),
                shared_v.clone(),
                groups[me % GROUPS].clone(),
                own[me].clone(),
            ];
            scope.spawn(move || {
                let mut client = Client {
                    env,
                    conn: Conn::open(&env.socket).expect("cannot connect"),
                    rng: Rng(0x9e37_79b9_7f4a_7c15 ^ ((me as u64 + 1) * 0x1000_0001)),
                    me,
                    stats: Stats::default(),
                };
                let mut held: Vec<Held> = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    if held.len() < 3 && (held.is_empty() || client.rng.below(2) == 0) {
                        let volume = choices[client.rng.below(choices.len())].clone();
                        if let Some(h) = client.take(&volume, n) {
                            held.push(h);
                        }
                    } else {
                        let i = client.rng.below(held.len());
                        let h = held.swap_remove(i);
                        client.release(h);
                    }
                    // Now and then a fresh connection, as dockerd opens new ones too.
                    if client.rng.below(50) == 0 {
                        client.conn = Conn::open(&env.socket).expect("cannot reconnect");
                    }
                }
                for h in held.drain(..) {
                    client.release(h);
                }
                results.lock().unwrap().push(client.stats);
            });
        }
    });
    let took = started.elapsed();

    let mut mounts = Vec::new();
    let mut unmounts = Vec::new();
    let mut errors = Vec::new();
    let mut written: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for stats in results.into_inner().unwrap() {
        mounts.extend(stats.mounts);
        unmounts.extend(stats.unmounts);
        errors.extend(stats.errors);
        for (volume, file) in stats.written {
            written.entry(volume).or_default().insert(file);
        }
    }
    mounts.sort();
    unmounts.sort();
    let pct = |v: &[Duration], p: f64| v[((v.len() as f64 - 1.0) * p) as usize];
    let calls = mounts.len() + unmounts.len();
    println!(
        "load: {CLIENTS} clients for {took:.1?}: {} Mounts, {} Unmounts ({:.0} calls/s); Mount median {:.2?}, p99 {:.2?}, max {:.2?}; Unmount median {:.2?}, p99 {:.2?}, max {:.2?}; daemon peak RSS {:.1} MiB; {} errors",
        mounts.len(),
        unmounts.len(),
        calls as f64 / took.as_secs_f64(),
        pct(&mounts, 0.5),
        pct(&mounts, 0.99),
        mounts.last().unwrap(),
        pct(&unmounts, 0.5),
        pct(&unmounts, 0.99),
        unmounts.last().unwrap(),
        rss_kib(pid) as f64 / 1024.0,
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors under load, the first ones:\n{}",
        errors.len(),
        errors[..errors.len().min(20)].join("\n")
    );
    assert!(
        mounts.len() >= CLIENTS * 10,
        "only {} mounts in {took:?}",
        mounts.len()
    );

    // Counts exactly right: nothing on record, nothing mounted.
    let root = env.seen(&env.root);
    for v in &all {
        let records = root.join(&v.name).join("activemounts");
        let left: Vec<String> = std::fs::read_dir(&records)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.is_empty(), "volume {}: records left {left:?}", v.name);
        let status = env.get_ok(&v.name)["Status"].clone();
        assert_eq!(
            (&status["Mounted"], &status["ActiveMounts"]),
            (&false.into(), &0.into()),
            "volume {}",
            v.name
        );
        env.assert_not_mounted(&v.name);
    }
    let overlays: Vec<String> = env
        .anchor
        .mountinfo()
        .into_iter()
        .filter(|m| m.fstype == "overlay")
        .map(|m| m.line)
        .collect();
    assert!(overlays.is_empty(), "overlays left: {overlays:#?}");

    // No leaked descriptors (the clients' connections are closed).
    wait_until(
        Duration::from_secs(10),
        "the daemon's descriptors to return to their number before",
        || fd_count(pid) <= fds_before,
    );

    // No stray files: the volumes and the trash (emptied), each volume complete, no
    // temporaries anywhere outside the uppers.
    let trash = root.join(".trash");
    wait_until(Duration::from_secs(30), "the trash to be emptied", || {
        std::fs::read_dir(&trash).unwrap().next().is_none()
    });
    let mut expected: BTreeSet<String> = all.iter().map(|v| v.name.clone()).collect();
    expected.insert(".trash".into());
    let entries: BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, expected, "the state directory");
    for v in &all {
        let dir = root.join(&v.name);
        let entries: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let want: BTreeSet<String> = [
            "metadata.json",
            "upper",
            "workdir",
            "mountpoint",
            "activemounts",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(entries, want, "volume {}", v.name);
        let mountpoint: Vec<_> = std::fs::read_dir(dir.join("mountpoint")).unwrap().collect();
        assert!(
            mountpoint.is_empty(),
            "volume {}: files under the unmounted mountpoint",
            v.name
        );
    }

    // Nothing written to a persistent volume was lost.
    for (volume, files) in &written {
        let upper: &Path = &root.join(volume).join("upper");
        let missing: Vec<&String> = files.iter().filter(|f| !upper.join(f).exists()).collect();
        assert!(
            missing.is_empty(),
            "volume {volume}: {} of {} written files lost, e.g. {:?}",
            missing.len(),
            files.len(),
            &missing[..missing.len().min(5)]
        );
    }
    assert!(env.daemon().try_status().is_none(), "the daemon exited");
}
