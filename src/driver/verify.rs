//! After the last Unmount: the unmount itself, and the look for copies of the overlay in other
//! mount namespaces. Both happen here, on background threads, after the Unmount has replied,
//! while the volume stays locked: nothing can mount, reset or remove it before they are done, and
//! queries wait for the unmount ([`Driver::settle`]).
//!
//! Why after the reply: unmounting an overlay syncs its upper's whole file system (overlayfs'
//! `sync_fs` at superblock shutdown), which costs more than the plugin's own bookkeeping, and
//! for a container that wrote much it takes as long as writing that back. dockerd has nothing
//! to wait for: the container is gone, and its last record is deleted before the reply.
//! A crash before the unmount leaves the "mounted, no records" row of the driver's state
//! machine; a busy mountpoint (a process still inside it) stays mounted the same way, with a
//! warning in the log, and the next Mount reuses the overlay (a volatile one is refused until
//! it is free).
//!
//! Why look: a process whose mount namespace was copied while the overlay was mounted (a
//! container of another engine, anything run under `unshare -m`) keeps its copy of the
//! overlay after the unmount here, and that upper must never get a second overlay. Finding
//! such copies means reading the mount table of every mount namespace (`/proc/*/mountinfo`):
//! milliseconds on a busy host, many times the mount itself. So Mount does not look; a thread
//! here does, once for all the volumes waiting.
//!
//! The mark that the look is still to be made is overlayfs' own: every mount creates
//! `workdir/work` ([`VolumeDir::overlay_work`]), and the look removes it when it finds no
//! copy. A Mount or Remove that finds it (the look found a copy, or never ran: a crash, the
//! process stopped, a busy mountpoint, a mount made by the Go version) looks itself and
//! refuses while a copy is held.
//!
//! The last mount record does not wait (the mark says whether the look is still to be made):
//! the Unmount renames it into the trash, cheaper than deleting it, and it is deleted here.
//!
//! These threads must not take any volume's lock: each job brings its own.

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use super::*;

/// Stack of the threads: they unmount and parse mount tables, nothing recursive.
const STACK_SIZE: usize = 128 * 1024;

/// Unmounts made at once. Each syncs the upper's file system; made side by side (several
/// containers stopping at once, or a CI runner cycling volumes), their syncs share the file
/// system's journal commits, where one after the other each would wait for its own.
const UNMOUNTERS: usize = 4;

/// One volume whose last mount record was just released, its overlay still mounted here and
/// the volume still locked.
pub(super) struct Job {
    pub name: VolumeName,
    pub vol: VolumeDir,
    pub lock: store::VolumeLock,
    /// Its last mount record, renamed into the trash: deleted here.
    pub trashed: Option<PathBuf>,
    /// Told that the volume's `activemounts/` is empty once its overlay is unmounted and no
    /// copy is held, so that the next Mount need not read it.
    pub no_records: Arc<super::cache::NoRecords>,
}

/// Volumes whose overlay is still to be unmounted by a job, and the signal that some were.
type Pending = Arc<(Mutex<HashSet<VolumeName>>, Condvar)>;

/// Handle to the threads that finish last Unmounts: [`UNMOUNTERS`] that unmount, one that
/// looks (for several volumes at once when they queue up). Dropping it lets them finish the
/// jobs queued and waits for them, so that a clean stop leaves nothing mounted for nobody.
pub(super) struct Verifier {
    jobs: Option<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    pending: Pending,
}

impl Verifier {
    pub(super) fn start<S: Sys>(sys: Arc<S>) -> io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let (to_look, looks) = mpsc::channel::<Job>();
        let pending: Pending = Arc::new((Mutex::new(HashSet::new()), Condvar::new()));
        let spawn = |name: &str, work: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .stack_size(STACK_SIZE)
                .spawn(work)
        };
        let mut threads = Vec::with_capacity(UNMOUNTERS + 1);
        let looker = sys.clone();
        threads.push(spawn(
            "looker",
            Box::new(move || {
                while let Ok(first) = looks.recv() {
                    let mut batch = vec![first];
                    batch.extend(looks.try_iter());
                    drop(look(&*looker, batch));
                }
            }),
        )?);
        for _ in 0..UNMOUNTERS {
            let (sys, queue, to_look, done) =
                (sys.clone(), queue.clone(), to_look.clone(), pending.clone());
            threads.push(spawn(
                "unmounter",
                Box::new(move || {
                    loop {
                        // One waits in `recv`, the others for the queue's lock.
                        let next = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok(job) = next else { break };
                        let name = job.name.clone();
                        let (unmounted, locks) = unmount_all(&*sys, vec![job]);
                        let mut set = done.0.lock().unwrap_or_else(PoisonError::into_inner);
                        set.remove(&name);
                        drop(set);
                        done.1.notify_all();
                        drop(locks);
                        for job in unmounted {
                            if let Err(job) = to_look.send(job) {
                                drop(look(&*sys, vec![job.0]));
                            }
                        }
                    }
                }),
            )?);
        }
        Ok(Self {
            jobs: Some(jobs),
            threads,
            pending,
        })
    }

    /// Queues `job`; gives it back when the threads are gone.
    pub(super) fn submit(&self, job: Job) -> Result<(), Job> {
        let name = job.name.clone();
        self.set_pending(&name, true);
        let Some(jobs) = &self.jobs else {
            self.set_pending(&name, false);
            return Err(job);
        };
        jobs.send(job).map_err(|e| {
            self.set_pending(&name, false);
            e.0
        })
    }

    /// Waits until no job has `name`'s overlay still to unmount.
    pub(super) fn wait_unmounted(&self, name: &VolumeName) {
        let (set, unmounted) = &*self.pending;
        let mut pending = set.lock().unwrap_or_else(PoisonError::into_inner);
        while pending.contains(name) {
            pending = unmounted
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn set_pending(&self, name: &VolumeName, on: bool) {
        let mut pending = self
            .pending
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if on {
            pending.insert(name.clone());
        } else {
            pending.remove(name);
        }
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        // The unmounters end once the queue is empty, and with them the looker's queue.
        drop(self.jobs.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Finishes the jobs' last Unmounts ([`unmount_all`], then [`look`]). Returns the volumes'
/// locks, for the caller to drop once it is done with them.
pub(super) fn finish<S: Sys + ?Sized>(sys: &S, jobs: Vec<Job>) -> Vec<store::VolumeLock> {
    let (unmounted, mut locks) = unmount_all(sys, jobs);
    locks.extend(look(sys, unmounted));
    locks
}

/// Unmounts the jobs' overlays. Returns the jobs whose overlay is unmounted, and the locks of
/// the others (still mounted: busy), which need no look, their records deleted.
fn unmount_all<S: Sys + ?Sized>(sys: &S, jobs: Vec<Job>) -> (Vec<Job>, Vec<store::VolumeLock>) {
    let mut locks = Vec::with_capacity(jobs.len());
    let mut unmounted = Vec::with_capacity(jobs.len());
    for job in jobs {
        let name = &job.name;
        let mountpoint = job.vol.mountpoint();
        match sys.unmount(&mountpoint) {
            Ok(()) => {
                log::info!("unmounted volume {name}");
                failpoint!("unmount.unmounted");
                unmounted.push(job);
                continue;
            }
            Err(SysError::Busy) => log::warn!(
                "volume {name} stays mounted after its last Unmount: {mountpoint:?} is busy (a \
                 process still uses files under it); the next Mount uses it as it is"
            ),
            Err(e) => log::warn!(
                "volume {name} stays mounted after its last Unmount: {}",
                crate::error_chain(&DriverError::Unmount {
                    name: name.clone(),
                    source: e,
                })
            ),
        }
        delete_trashed(&job);
        locks.push(job.lock);
    }
    (unmounted, locks)
}

/// Deletes the job's last record from the trash: after the unmount (which queries wait for;
/// deleting a file costs more than renaming it), before anyone else can lock the volume (else
/// the janitor deletes it at the next start).
fn delete_trashed(job: &Job) {
    if let Some(trashed) = &job.trashed {
        let _ = std::fs::remove_file(trashed);
    }
}

/// Deletes the (unmounted) jobs' records, looks once for copies of their overlays, and removes
/// the mark of each none of whose copies is held. Returns their locks.
fn look<S: Sys + ?Sized>(sys: &S, unmounted: Vec<Job>) -> Vec<store::VolumeLock> {
    let mut locks = Vec::with_capacity(unmounted.len());
    if unmounted.is_empty() {
        return locks;
    }
    unmounted.iter().for_each(delete_trashed);
    let uppers: Vec<PathBuf> = unmounted.iter().map(|j| j.vol.upper()).collect();
    let found = sys.overlay_holders_of(&uppers);
    for (i, job) in unmounted.into_iter().enumerate() {
        let name = &job.name;
        match found.as_ref().map(|all| &all[i]) {
            Ok(holders) => match holders.first() {
                None => match std::fs::remove_dir(job.vol.overlay_work()) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        // Left by a mount cut short, say: the next Mount looks itself.
                        log::debug!("volume {name}: keeping {:?}: {e}", job.vol.overlay_work())
                    }
                    _ => job.no_records.look(name, &job.vol),
                },
                Some(holder) => log::warn!(
                    "volume {name}: {holder} in another mount namespace still holds a copy of \
                     its overlay; Mount and Remove are refused until it is gone"
                ),
            },
            Err(e) => log::warn!(
                "volume {name}: cannot look for copies of its overlay ({}); the next Mount \
                 looks again",
                crate::error_chain(e)
            ),
        }
        locks.push(job.lock);
    }
    locks
}
