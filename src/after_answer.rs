//! Work a request leaves for after its answer: what no client waits for, and what the state
//! on disk stays true without (a new mount record's details, a wake-up of the janitor).
//!
//! On a connection's own thread the server opens a [`Deferral`] around the driver call. Work
//! [`defer`]red while it is open runs once hyper has written the answer (a task of the
//! thread's runtime), and in any case before the next request of that connection is handled
//! ([`run_pending`] at its start) and before the thread ends. Anywhere else (the blocking
//! pool, the admin commands, unit tests) [`defer`] runs the work at once.
//!
//! Deferred work may hold a volume's lock until it has run: that is why it runs before the
//! connection's next request, which may want the same lock on the same thread. It must never
//! be work whose loss in a crash would leave the state on disk telling a lie.

use std::cell::RefCell;

type Work = Box<dyn FnOnce()>;

thread_local! {
    /// Work deferred while a [`Deferral`] is open on this thread; `None` when none is.
    static COLLECTING: RefCell<Option<Vec<Work>>> = const { RefCell::new(None) };
    /// Work of answered requests that has not run yet.
    static PENDING: RefCell<Vec<Work>> = const { RefCell::new(Vec::new()) };
}

/// Runs `work` after the answer when this thread has a [`Deferral`] open, else now.
pub fn defer(work: impl FnOnce() + 'static) {
    let work: Work = Box::new(work);
    let now = COLLECTING.with_borrow_mut(|collecting| match collecting {
        Some(deferred) => {
            deferred.push(work);
            None
        }
        None => Some(work),
    });
    if let Some(work) = now {
        work();
    }
}

/// While open, [`defer`] on this thread keeps work back for [`run_pending`].
pub struct Deferral(());

impl Deferral {
    /// Starts keeping work back (none is kept back already).
    pub fn begin() -> Deferral {
        COLLECTING.with_borrow_mut(|collecting| *collecting = Some(Vec::new()));
        Deferral(())
    }

    /// Stops keeping work back; returns whether any waits for [`run_pending`].
    pub fn end(self) -> bool {
        // Drop does the work: a Deferral ended by a panic's unwinding leaves its work
        // pending too, not lost.
        drop(self);
        PENDING.with_borrow(|pending| !pending.is_empty())
    }
}

impl Drop for Deferral {
    fn drop(&mut self) {
        let deferred = COLLECTING.with_borrow_mut(Option::take).unwrap_or_default();
        PENDING.with_borrow_mut(|pending| pending.extend(deferred));
    }
}

/// Runs the work this thread's answered requests left, in the order it was deferred.
pub fn run_pending() {
    loop {
        let pending = PENDING.with_borrow_mut(std::mem::take);
        if pending.is_empty() {
            return;
        }
        for work in pending {
            // A panic fails this piece of work alone (what it held, a lock, is dropped), not
            // the connection whose request comes next.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_err() {
                log::error!("work left for after an answer panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn log_to(log: &Rc<RefCell<Vec<&'static str>>>, what: &'static str) -> impl FnOnce() + use<> {
        let log = log.clone();
        move || log.borrow_mut().push(what)
    }

    #[test]
    fn work_waits_for_run_pending_only_while_a_deferral_is_open() {
        let log = Rc::new(RefCell::new(Vec::new()));
        defer(log_to(&log, "at once"));
        assert_eq!(*log.borrow(), ["at once"]);

        let deferral = Deferral::begin();
        defer(log_to(&log, "first"));
        defer(log_to(&log, "second"));
        assert_eq!(log.borrow().len(), 1, "ran while the deferral was open");
        assert!(deferral.end());
        defer(log_to(&log, "after the deferral"));
        assert_eq!(log.borrow().len(), 2, "the deferral is over: at once");
        run_pending();
        assert_eq!(
            *log.borrow(),
            ["at once", "after the deferral", "first", "second"]
        );
        run_pending();
        assert_eq!(log.borrow().len(), 4, "ran twice");
        assert!(
            !Deferral::begin().end(),
            "nothing deferred, nothing pending"
        );
    }

    #[test]
    fn a_dropped_deferral_leaves_its_work_pending() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let deferral = Deferral::begin();
        defer(log_to(&log, "kept"));
        drop(deferral);
        assert!(log.borrow().is_empty());
        run_pending();
        assert_eq!(*log.borrow(), ["kept"]);
    }

    #[test]
    fn a_panic_fails_its_own_work_only() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let deferral = Deferral::begin();
        defer(|| panic!("deferred work panics"));
        defer(log_to(&log, "next"));
        deferral.end();
        run_pending();
        assert_eq!(*log.borrow(), ["next"]);
    }

    #[test]
    fn work_deferred_by_pending_work_runs_at_once() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let deferral = Deferral::begin();
        let inner = log_to(&log, "inner");
        let outer = log_to(&log, "outer");
        defer(move || {
            outer();
            defer(inner);
        });
        deferral.end();
        run_pending();
        assert_eq!(*log.borrow(), ["outer", "inner"]);
    }
}
