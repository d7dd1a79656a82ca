//! After the last Unmount: the look for copies of the overlay in other mount namespaces.
//!
//! A process whose mount namespace was copied while the overlay was mounted (a container of
//! another engine, anything run under `unshare -m`) keeps its copy of the overlay after the
//! last Unmount here, and that upper must never get a second overlay. Finding such copies
//! means reading the mount table of every mount namespace (`/proc/*/mountinfo`): milliseconds
//! on a busy host, many times the mount itself. So Mount does not look; the last Unmount does,
//! in the background once its reply is on its way, while the volume stays locked (nothing can
//! mount it before the look is done).
//!
//! The mark that the look is still to be made is overlayfs' own: every mount creates
//! `workdir/work` ([`VolumeDir::overlay_work`]), and the look removes it when it finds no
//! copy. A Mount or Remove that finds it (the look found a copy, or never ran: a crash, the
//! process stopped, a busy mountpoint unmounted by hand, a mount made by the Go version) looks
//! itself and refuses while a copy is held. Several last Unmounts waiting at once share one
//! look.
//!
//! The last mount record does not wait for the look (the mark says whether it is still to be
//! made): the Unmount renames it into the trash, cheaper than deleting it, and it is deleted
//! here after the reply.

use std::sync::Arc;
use std::sync::mpsc;

use super::*;

/// Stack of the thread: it parses mount tables, nothing recursive.
const STACK_SIZE: usize = 128 * 1024;

/// One volume whose overlay was just unmounted here, still locked.
pub(super) struct Job {
    pub name: VolumeName,
    pub vol: VolumeDir,
    pub lock: store::VolumeLock,
    /// Its last mount record, renamed into the trash: deleted here.
    pub trashed: Option<PathBuf>,
}

/// Handle to the thread that makes the looks; it ends when the handle is dropped.
pub(super) struct Verifier {
    jobs: mpsc::Sender<Job>,
}

impl Verifier {
    pub(super) fn start<S: Sys>(sys: Arc<S>) -> io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("verifier".into())
            .stack_size(STACK_SIZE)
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    batch.extend(queue.try_iter());
                    look(&*sys, batch);
                }
            })?;
        Ok(Self { jobs })
    }

    /// Queues `job`; gives it back when the thread is gone.
    pub(super) fn submit(&self, job: Job) -> Result<(), Job> {
        self.jobs.send(job).map_err(|e| e.0)
    }
}

/// Looks once for copies of all the jobs' overlays; removes the mark of each volume none of
/// whose copies is held, then unlocks them.
pub(super) fn look<S: Sys + ?Sized>(sys: &S, jobs: Vec<Job>) {
    for trashed in jobs.iter().filter_map(|j| j.trashed.as_ref()) {
        // Before anyone else can lock the volume (else the janitor deletes it at the next
        // start).
        let _ = std::fs::remove_file(trashed);
    }
    let uppers: Vec<PathBuf> = jobs.iter().map(|j| j.vol.upper()).collect();
    let found = sys.overlay_holders_of(&uppers);
    for (i, job) in jobs.into_iter().enumerate() {
        let name = &job.name;
        match found.as_ref().map(|all| &all[i]) {
            Ok(holders) => match holders.first() {
                None => match std::fs::remove_dir(job.vol.overlay_work()) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        // Left by a mount cut short, say: the next Mount looks itself.
                        log::debug!("volume {name}: keeping {:?}: {e}", job.vol.overlay_work())
                    }
                    _ => {}
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
        drop(job.lock);
    }
}
