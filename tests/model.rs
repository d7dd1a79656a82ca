//! A model of the whole state machine, checked against the real daemon with real mounts.
//!
//! proptest generates sequences of Create(volume, volatile), Mount(volume, id),
//! Unmount(volume, id), Remove(volume), Write(volume, file) (through the mount, when it is
//! mounted) and Restart (`kill -9` and a new daemon on the same root and socket) over three
//! volumes, three mount IDs and three file names. A small in-memory model says what each step
//! must do: per volume, whether it exists, whether it is volatile, the count of each mount ID,
//! and the files its changes hold.
//!
//! After every step: the reply (success, or the error named by the model) is the model's; the
//! kernel (the anchor namespace's mountinfo) has exactly one overlay on a volume's mountpoint
//! while any count is above zero and none otherwise, never two; the records in
//! `activemounts/` are exactly the model's counts; `Get` and `List` say what the model says;
//! the upper holds exactly the files the model expects (a volatile volume's are gone from the
//! first mount after its last unmount); the merged view shows the base and those files; the
//! state root holds nothing but `.trash` and the volumes. A failure shrinks to a short
//! sequence of steps, printed as `Mount(v1, id2)` and the like.

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use common::daemon::{Env, names};
use proptest::prelude::*;
use proptest::strategy::{NewTree, ValueTree};
use proptest::test_runner::{TestCaseError, TestRng, TestRunner};
use serde_json::Value;

const VOLUMES: usize = 3;
const IDS: usize = 3;
const FILES: usize = 3;

fn vol(v: usize) -> String {
    format!("v{v}")
}

/// A mount ID as dockerd makes them: 64 hex digits.
fn mount_id(i: usize) -> String {
    format!("{:064x}", 0xa11ce_usize + i)
}

fn file(f: usize) -> String {
    format!("f{f}")
}

#[derive(Clone, Copy)]
enum Step {
    Create { vol: usize, volatile: bool },
    Mount { vol: usize, id: usize },
    Unmount { vol: usize, id: usize },
    Remove { vol: usize },
    Write { vol: usize, file: usize },
    Restart,
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Step::Create { vol, volatile } => {
                let kind = if volatile { "volatile" } else { "persistent" };
                write!(f, "Create(v{vol}, {kind})")
            }
            Step::Mount { vol, id } => write!(f, "Mount(v{vol}, id{id})"),
            Step::Unmount { vol, id } => write!(f, "Unmount(v{vol}, id{id})"),
            Step::Remove { vol } => write!(f, "Remove(v{vol})"),
            Step::Write { vol, file } => write!(f, "Write(v{vol}, f{file})"),
            Step::Restart => write!(f, "Restart"),
        }
    }
}

/// Sequences of 30 to 60 steps, each drawn with the model's state in view, so that most of
/// them do something (an Unmount mostly names a mounted ID, a Write a mounted volume) while
/// invalid steps still come up. A failing sequence shrinks by deleting steps, as delta
/// debugging does: halves, then quarters, and so on down to single steps, keeping every
/// deletion after which it still fails. The model gives every sequence a meaning, so any
/// deletion is a valid test.
#[derive(Debug)]
struct Sequences;

impl Strategy for Sequences {
    type Tree = SequenceTree;
    type Value = Vec<Step>;

    fn new_tree(&self, runner: &mut TestRunner) -> NewTree<Self> {
        let rng = runner.rng();
        let len = rng.random_range(30..=60);
        let mut model = vec![Volume::default(); VOLUMES];
        let steps: Vec<Step> = (0..len)
            .map(|n| {
                let step = draw(rng, &model);
                model_step(&mut model, step, n);
                step
            })
            .collect();
        Ok(SequenceTree {
            chunk: steps.len() / 2,
            steps,
            pos: 0,
            undo: None,
        })
    }
}

/// One step, likely a meaningful one in the state `model` describes.
fn draw(rng: &mut TestRng, model: &[Volume]) -> Step {
    // A volume among `preferred` most of the time, any volume otherwise.
    let volume = |rng: &mut TestRng, preferred: &dyn Fn(&Volume) -> bool, p: f64| {
        let some: Vec<usize> = (0..VOLUMES).filter(|v| preferred(&model[*v])).collect();
        if !some.is_empty() && rng.random_bool(p) {
            some[rng.random_range(0..some.len())]
        } else {
            rng.random_range(0..VOLUMES)
        }
    };
    // Weights of Create, Mount, Unmount, Remove, Write, Restart: Unmount and Write are mostly
    // useful while something is mounted.
    let any_mounted = model.iter().any(Volume::mounted);
    let weights = if any_mounted {
        [3, 5, 6, 1, 4, 1]
    } else {
        [3, 5, 1, 1, 1, 1]
    };
    let mut pick = rng.random_range(0..weights.iter().sum::<u32>());
    let kind = weights
        .iter()
        .position(|w| {
            let here = pick < *w;
            pick = pick.saturating_sub(*w);
            here
        })
        .unwrap();
    match kind {
        0 => {
            let vol = rng.random_range(0..VOLUMES);
            let volatile = if model[vol].exists && rng.random_bool(0.8) {
                model[vol].volatile
            } else {
                rng.random_bool(0.5)
            };
            Step::Create { vol, volatile }
        }
        1 => Step::Mount {
            vol: volume(rng, &|m| m.exists, 0.85),
            id: rng.random_range(0..IDS),
        },
        2 => {
            let vol = volume(rng, &|m| m.mounted(), 0.85);
            let ids: Vec<usize> = model[vol].counts.keys().copied().collect();
            let id = if !ids.is_empty() && rng.random_bool(0.85) {
                ids[rng.random_range(0..ids.len())]
            } else {
                rng.random_range(0..IDS)
            };
            Step::Unmount { vol, id }
        }
        3 => Step::Remove {
            vol: volume(rng, &|m| m.exists, 0.8),
        },
        4 => Step::Write {
            vol: volume(rng, &|m| m.mounted(), 0.9),
            file: rng.random_range(0..FILES),
        },
        _ => Step::Restart,
    }
}

struct SequenceTree {
    steps: Vec<Step>,
    /// How many steps the next candidate deletes, and from where.
    chunk: usize,
    pos: usize,
    /// The steps the current candidate deleted, and where they were.
    undo: Option<(usize, Vec<Step>)>,
}

impl SequenceTree {
    /// Deletes the next chunk; false when every chunk size down to one step was tried.
    fn next_candidate(&mut self) -> bool {
        while self.chunk > 0 {
            if self.pos < self.steps.len() {
                let end = (self.pos + self.chunk).min(self.steps.len());
                let deleted = self.steps.drain(self.pos..end).collect();
                self.undo = Some((self.pos, deleted));
                return true;
            }
            self.chunk /= 2;
            self.pos = 0;
        }
        false
    }
}

impl ValueTree for SequenceTree {
    type Value = Vec<Step>;

    fn current(&self) -> Vec<Step> {
        self.steps.clone()
    }

    /// The current sequence fails: keep it, try deleting more.
    fn simplify(&mut self) -> bool {
        self.undo = None;
        self.next_candidate()
    }

    /// The candidate passed: put its steps back and try the next deletion (proptest runs the
    /// value this leaves; `false` leaves the last failing sequence).
    fn complicate(&mut self) -> bool {
        let Some((pos, deleted)) = self.undo.take() else {
            return false;
        };
        self.pos = pos + deleted.len();
        self.steps.splice(pos..pos, deleted);
        self.next_candidate()
    }
}

/// What the model knows of one volume.
#[derive(Debug, Clone, Default)]
struct Volume {
    exists: bool,
    volatile: bool,
    /// Uses per mount ID (no zero entries).
    counts: BTreeMap<usize, u64>,
    /// The volume's changes: file → contents.
    files: BTreeMap<usize, String>,
}

impl Volume {
    fn mounted(&self) -> bool {
        !self.counts.is_empty()
    }
}

/// What a step must answer.
#[derive(Debug, PartialEq)]
enum Expect {
    Ok,
    /// An error whose message contains this.
    Err(&'static str),
    /// Not sent to the daemon.
    Nothing,
}

/// Applies `step` to the model; returns what the daemon must answer.
fn model_step(model: &mut [Volume], step: Step, n: usize) -> Expect {
    match step {
        Step::Create { vol, volatile } => {
            let m = &mut model[vol];
            if !m.exists {
                *m = Volume {
                    exists: true,
                    volatile,
                    ..Volume::default()
                };
                Expect::Ok
            } else if m.volatile == volatile {
                Expect::Ok
            } else {
                Expect::Err("already exists with other options")
            }
        }
        Step::Mount { vol, id } => {
            let m = &mut model[vol];
            if !m.exists {
                return Expect::Err("does not exist");
            }
            if !m.mounted() && m.volatile {
                m.files.clear();
            }
            *m.counts.entry(id).or_default() += 1;
            Expect::Ok
        }
        Step::Unmount { vol, id } => {
            let m = &mut model[vol];
            if !m.exists {
                return Expect::Err("does not exist");
            }
            match m.counts.get_mut(&id) {
                None => Expect::Err("has no mount with ID"),
                Some(c) => {
                    *c -= 1;
                    if *c == 0 {
                        m.counts.remove(&id);
                    }
                    Expect::Ok
                }
            }
        }
        Step::Remove { vol } => {
            model[vol] = Volume::default();
            Expect::Ok
        }
        Step::Write { vol, file } => {
            let m = &mut model[vol];
            if !m.exists || !m.mounted() {
                return Expect::Nothing;
            }
            m.files.insert(file, format!("written at step {n}"));
            Expect::Nothing
        }
        Step::Restart => Expect::Nothing,
    }
}

// ----- Forks and open files ----------------------------------------------------------------

/// Taken for writing around every process start, for reading around every use of a file inside
/// an overlay. Between its fork and its exec a child holds copies of all the test process's
/// descriptors: one of a file inside a volume would make that volume's Unmount fail (EBUSY) at
/// random while the tests run in parallel.
static FORKS: RwLock<()> = RwLock::new(());

fn forking<T>(f: impl FnOnce() -> T) -> T {
    let _guard = FORKS.write().unwrap_or_else(PoisonError::into_inner);
    f()
}

fn inside_mount<T>(f: impl FnOnce() -> T) -> T {
    let _guard = FORKS.read().unwrap_or_else(PoisonError::into_inner);
    f()
}

struct World {
    env: Env,
    bases: Vec<PathBuf>,
}

impl World {
    fn new() -> World {
        let mut env = forking(Env::new);
        let bases = (0..VOLUMES)
            .map(|v| {
                let base = env.dir.join(format!("base-{v}"));
                std::fs::create_dir(&base).unwrap();
                std::fs::write(base.join("base.txt"), format!("base of v{v}")).unwrap();
                base
            })
            .collect();
        forking(|| env.start(&[]));
        World { env, bases }
    }

    /// Sends `step` to the daemon (or does it); the reply as `Ok`/`Err(message)`.
    fn run(&mut self, step: Step, model: &[Volume], n: usize) -> Option<Result<(), String>> {
        let env = &mut self.env;
        Some(match step {
            Step::Create { vol: v, volatile } => env.create(
                &vol(v),
                &[
                    ("base", self.bases[v].to_str().unwrap()),
                    ("volatile", if volatile { "true" } else { "false" }),
                ],
            ),
            Step::Mount { vol: v, id } => env.mount(&vol(v), &mount_id(id)).map(|mp| {
                assert_eq!(PathBuf::from(&mp), env.mountpoint(&vol(v)), "Mountpoint");
            }),
            Step::Unmount { vol: v, id } => env.unmount(&vol(v), &mount_id(id)),
            Step::Remove { vol: v } => env.remove(&vol(v)),
            Step::Write { vol: v, file: f } => {
                // Only where the model says it is mounted: writing into an unmounted
                // mountpoint directory would write beside the overlay.
                if model[v].exists && model[v].mounted() {
                    let path = env.seen(&env.mountpoint(&vol(v))).join(file(f));
                    inside_mount(|| std::fs::write(&path, format!("written at step {n}")))
                        .unwrap_or_else(|e| panic!("cannot write {path:?}: {e}"));
                }
                return None;
            }
            Step::Restart => {
                env.kill9();
                forking(|| env.start(&[]));
                return None;
            }
        })
    }

    /// Everything observable agrees with the model.
    fn check(&self, model: &[Volume]) -> Result<(), TestCaseError> {
        let env = &self.env;
        let expected: Vec<String> = (0..VOLUMES).filter(|v| model[*v].exists).map(vol).collect();
        prop_assert_eq!(env.list(), expected.clone(), "List");
        let mut root = expected;
        root.push(".trash".into());
        root.sort();
        let seen = names(&env.root);
        prop_assert_eq!(seen, root, "entries of the state root");

        for (v, m) in model.iter().enumerate() {
            let name = vol(v);
            // Get first: like any client's, it waits for what a last Unmount leaves for after
            // its reply (the unmount of the overlay), so the kernel is read when that is done.
            let get = env.get(&name);
            let mp = env.mountpoint(&name);
            let all = env.mounts_under(&mp);
            let overlays = env.overlays_at(&mp);
            let lines: Vec<&String> = all.iter().map(|m| &m.line).collect();
            prop_assert!(
                all.len() == overlays.len() && overlays.len() <= 1,
                "{} has stacked or foreign mounts: {:#?}",
                name,
                lines
            );
            prop_assert_eq!(
                overlays.len(),
                usize::from(m.mounted()),
                "overlays on {}'s mountpoint (model counts {:?}): {:#?}",
                name,
                m.counts,
                lines
            );
            if !m.exists {
                prop_assert!(!env.volume_dir(&name).exists(), "{} exists", name);
                let err = get
                    .err()
                    .unwrap_or_else(|| format!("Get of removed volume {name} succeeded"));
                prop_assert!(err.contains("does not exist"), "Get {}: {}", name, err);
                continue;
            }

            // Records on disk.
            let on_disk = records(env, &name)?;
            let want: BTreeMap<String, u64> =
                m.counts.iter().map(|(i, c)| (mount_id(*i), *c)).collect();
            prop_assert_eq!(&on_disk, &want, "mount records of {}", name);

            // Get.
            let volume = get.map_err(|e| TestCaseError::fail(format!("Get {name} failed: {e}")))?;
            let status = &volume["Status"];
            prop_assert_eq!(&status["Mounted"], &Value::from(m.mounted()), "{}", volume);
            let total: u64 = m.counts.values().sum();
            prop_assert_eq!(&status["ActiveMounts"], &Value::from(total), "{}", volume);
            prop_assert_eq!(&status["Volatile"], &Value::from(m.volatile), "{}", volume);

            // The changes, in the upper and (while mounted) in the merged view.
            let want: BTreeMap<String, String> = m
                .files
                .iter()
                .map(|(f, text)| (file(*f), text.clone()))
                .collect();
            let upper = read_files(&env.upper(&name));
            prop_assert_eq!(&upper, &want, "files in {}'s upper", name);
            if m.mounted() {
                let mut merged_want = want.clone();
                merged_want.insert("base.txt".into(), format!("base of v{v}"));
                let merged = inside_mount(|| read_files(&env.seen(&mp)));
                prop_assert_eq!(&merged, &merged_want, "files seen through {}'s mount", name);
            }
            // Seen from outside the namespace: the directory under the overlay.
            prop_assert!(
                names(&mp).is_empty(),
                "files under {}'s mountpoint: {:?}",
                name,
                names(&mp)
            );
        }
        Ok(())
    }
}

/// The mount records in `activemounts/`: ID → UsageCount, temporaries included as errors.
fn records(env: &Env, name: &str) -> Result<BTreeMap<String, u64>, TestCaseError> {
    let dir = env.volume_dir(name).join("activemounts");
    let mut out = BTreeMap::new();
    for entry in names(&dir) {
        let text = std::fs::read(dir.join(&entry)).unwrap();
        if text.is_empty() {
            // A new mount ID's record before its details are written: one use.
            out.insert(entry, 1);
            continue;
        }
        let record: Value = serde_json::from_slice(&text).map_err(|e| {
            TestCaseError::fail(format!("{name}/activemounts/{entry} is not a record: {e}"))
        })?;
        let count = record["UsageCount"]
            .as_u64()
            .ok_or_else(|| TestCaseError::fail(format!("{name}/activemounts/{entry}: {record}")))?;
        out.insert(entry, count);
    }
    Ok(out)
}

/// Regular files directly in `dir` and their contents.
fn read_files(dir: &std::path::Path) -> BTreeMap<String, String> {
    names(dir)
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(&n))
                .unwrap_or_else(|e| panic!("cannot read {:?}: {e}", dir.join(&n)));
            (n, text)
        })
        .collect()
}

fn run_steps(steps: &[Step]) -> Result<(), TestCaseError> {
    let mut world = World::new();
    let mut model = vec![Volume::default(); VOLUMES];
    // What happened so far, for the failure message.
    let mut trace = Vec::new();
    let fail = |trace: &[String], why: String| {
        TestCaseError::fail(format!("{why}\nsteps run:\n{}", trace.join("\n")))
    };
    for (n, &step) in steps.iter().enumerate() {
        let expect = model_step(&mut model, step, n);
        let reply = world.run(step, &model, n);
        trace.push(match &reply {
            None => format!("  {n:2} {step:?}"),
            Some(Ok(())) => format!("  {n:2} {step:?} -> ok"),
            Some(Err(e)) => format!("  {n:2} {step:?} -> error: {e}"),
        });
        let matches = match (&expect, &reply) {
            (Expect::Nothing, None) | (Expect::Ok, Some(Ok(()))) => true,
            (Expect::Err(part), Some(Err(message))) => message.contains(part),
            _ => false,
        };
        if !matches {
            return Err(fail(
                &trace,
                format!(
                    "step {n} {step:?}: the model expects {expect:?}, the daemon answered {reply:?}"
                ),
            ));
        }
        if let Err(e) = world.check(&model) {
            return Err(fail(&trace, format!("after step {n} {step:?}: {e}")));
        }
    }
    // Whatever was removed or discarded is deleted in the background.
    let trash = world.env.root.join(".trash");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !names(&trash).is_empty() {
        if Instant::now() > deadline {
            return Err(fail(
                &trace,
                format!("the trash is not emptied: {:?}", names(&trash)),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        max_shrink_iters: 2000,
        max_shrink_time: 600_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_daemon_follows_the_model(steps in Sequences) {
        run_steps(&steps)?;
    }
}

/// The sequences that matter most, always run: counts per ID, a volatile discard only at the
/// first mount after the last unmount, a restart with mounts held, a Remove while mounted.
#[test]
fn a_fixed_sequence_follows_the_model() {
    use Step::*;
    let steps = [
        Create {
            vol: 0,
            volatile: true,
        },
        Mount { vol: 0, id: 0 },
        Mount { vol: 0, id: 0 },
        Mount { vol: 0, id: 1 },
        Write { vol: 0, file: 0 },
        Restart,
        Unmount { vol: 0, id: 0 },
        Unmount { vol: 0, id: 1 },
        Write { vol: 0, file: 1 },
        Unmount { vol: 0, id: 0 },
        Unmount { vol: 0, id: 0 },
        Restart,
        Mount { vol: 0, id: 2 },
        Create {
            vol: 0,
            volatile: false,
        },
        Create {
            vol: 1,
            volatile: false,
        },
        Mount { vol: 1, id: 0 },
        Write { vol: 1, file: 2 },
        Unmount { vol: 1, id: 0 },
        Mount { vol: 1, id: 1 },
        Remove { vol: 1 },
        Unmount { vol: 1, id: 1 },
        Create {
            vol: 1,
            volatile: true,
        },
        Mount { vol: 1, id: 1 },
    ];
    if let Err(e) = run_steps(&steps) {
        panic!("{e}");
    }
}
