//! Failpoints: crash the process for real (SIGKILL, no destructors, no flush) between two
//! durable steps, so that `tests/crash.rs` can prove every step leaves a state the next process
//! copes with.
//!
//! `failpoint!("name")` compiles to nothing unless the cargo feature `failpoints` is on. With
//! it, the process kills itself when the environment variable `DOCKER_ON_TOP_FAILPOINT` is
//! `name` (the first time that point is reached) or `name@N` (the N-th time, counting from 1).
//! A line `failpoint NAME fired` is written to stderr first, so a test can tell which point it
//! was. Names are `operation.step`; `tests/crash.rs` reads every `failpoint!` of the sources
//! and fails unless each one is exercised.

/// Marks a point between two durable steps where a test may kill the process.
#[cfg(feature = "failpoints")]
macro_rules! failpoint {
    ($name:literal) => {
        $crate::failpoint::hit($name)
    };
}

/// Marks a point between two durable steps where a test may kill the process (a no-op: built
/// without the `failpoints` feature).
#[cfg(not(feature = "failpoints"))]
macro_rules! failpoint {
    ($name:literal) => {
        ()
    };
}

/// The environment variable naming the failpoint to fire.
pub const ENV: &str = "DOCKER_ON_TOP_FAILPOINT";

/// Kills this process with SIGKILL if `name` is the armed failpoint and this is the hit it
/// waits for.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let armed = ARMED.get_or_init(|| {
        let value = std::env::var(ENV).ok()?;
        Some(match value.rsplit_once('@') {
            Some((point, n)) => (
                point.to_owned(),
                n.parse()
                    .unwrap_or_else(|_| panic!("{ENV}={value:?}: the part after @ is no number")),
            ),
            None => (value, 1),
        })
    });
    let Some((point, nth)) = armed else { return };
    if point != name || HITS.fetch_add(1, Ordering::SeqCst) + 1 != *nth {
        return;
    }
    {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "failpoint {name} fired");
    }
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    // SIGKILL cannot be caught; should the kill itself fail, never carry on past the point.
    std::process::abort();
}
