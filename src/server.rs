//! The HTTP transport: the plugin socket, the accept loop, graceful shutdown and idle exit.
//!
//! [`listen`] acquires the unix socket (from systemd, or by creating it); [`serve`] answers
//! HTTP/1.1 on it, handing each request's method, path and body to [`crate::wire`] and running
//! the decoded call. This module must not interpret requests or know about volumes, files or
//! mounts: everything it answers comes from `wire`, and every answer, errors included, is JSON.
//!
//! One thread accepts. The first [`DEDICATED_THREADS`] connections open at a time are each
//! served by a thread of their own, which runs the driver's (blocking) calls itself: handing
//! a call to a pool thread and back costs two thread wake-ups, more than an empty request
//! costs in all (75 of 106 µs here, BENCHMARKS.md), and dockerd keeps its few connections
//! open, so such a thread is paid for once. Those threads end with their connections (an idle
//! daemon has none). Connections beyond them (thousands, from a client gone wrong) cost a few
//! KiB each: they are served by the accepting thread and their calls run on a bounded pool
//! of blocking threads.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::{Future, pending};
use std::io;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{Level, debug, info, log, warn};
use sd_notify::NotifyState;
use thiserror::Error;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

use crate::driver::Driver;
use crate::wire::{self, Call, Reply, WireError};
use crate::{after_answer, logging};

mod socket;
pub use socket::{Listening, SocketFile, listen};

/// Largest request body read; larger ones are answered 413. dockerd's largest, a Create with
/// a base path of `PATH_MAX` bytes, is a few KiB.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest request head (request line and headers) hyper buffers; a larger one is answered
/// 431. What a connection can make the daemon hold is bounded by this and [`MAX_BODY`].
pub const MAX_HEAD: usize = 16 * 1024;
/// Connections served at once (fewer when the descriptor limit is low: half of it, the
/// driver needs the rest); further ones wait in the listen queue. When all are taken, a new
/// connection makes the oldest one that has sent no request for [`EVICT_AFTER`] close, or
/// else an idle keep-alive one: connections that send nothing cannot lock dockerd out.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a connection may go without sending a whole request, or sit idle after one,
/// before a new connection may take its place when all are taken (a connection whose
/// request is waiting to be read is never taken). dockerd sends its request as soon as it
/// connects.
pub const EVICT_AFTER: Duration = Duration::from_millis(200);
/// How long a client may take to send a request's headers, and how long an idle keep-alive
/// connection is kept open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send a request's body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a shutdown waits for open connections to finish their requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How [`serve`] behaves beyond answering requests.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Stop once no request has been in flight for this long (for socket activation).
    pub idle_timeout: Option<Duration>,
    /// How long a client may take to send a request's headers, and then its body; `None`:
    /// [`HEADER_READ_TIMEOUT`] and [`BODY_READ_TIMEOUT`].
    pub read_timeout: Option<Duration>,
}

/// Answers plugin calls on `listener` until `shutdown` completes or, with
/// [`ServeOptions::idle_timeout`], until no request has been in flight for that long.
///
/// Then it tells systemd it is stopping, closes the listener, lets every open connection
/// finish the request it is on (for at most [`DRAIN_TIMEOUT`]) and returns. The caller tells
/// systemd it is ready before calling this. Errors only when accepting fails persistently.
pub async fn serve(
    listener: UnixListener,
    driver: Arc<Driver>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        driver,
        activity: Activity::new(),
        body_timeout: opts.read_timeout.unwrap_or(BODY_READ_TIMEOUT),
    });
    let limit = connection_limit();
    let slots = Arc::new(Semaphore::new(limit));
    let open = Arc::new(OpenConnections::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let dedicated = Arc::new(AtomicUsize::new(0));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(opts.read_timeout.unwrap_or(HEADER_READ_TIMEOUT))
        .max_buf_size(MAX_HEAD);

    let mut shutdown = pin!(shutdown);
    let mut idle = pin!(async {
        match opts.idle_timeout {
            Some(timeout) => {
                shared.activity.idle_for(timeout).await;
                info!(
                    "no request for {}, stopping",
                    humantime::format_duration(timeout)
                );
            }
            None => pending().await,
        }
    });

    let result = 'accept: loop {
        let stream = tokio::select! {
            () = &mut shutdown => break Ok(()),
            () = &mut idle => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) if is_transient(&err) => {
                    warn!("cannot accept a connection: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(err) => break Err(err),
            },
        };
        // A slot for it: a free one, or one a connection that sends nothing gives up.
        let slot = loop {
            if let Ok(slot) = slots.clone().try_acquire_owned() {
                break slot;
            }
            if let Some(evicted) = open.evict_one() {
                debug!("all {limit} connection slots are taken: asking {evicted} to close");
            }
            tokio::select! {
                () = &mut shutdown => break 'accept Ok(()),
                () = &mut idle => break 'accept Ok(()),
                slot = slots.clone().acquire_owned() => break slot.expect("the semaphore is never closed"),
                () = tokio::time::sleep(EVICT_AFTER / 5) => {}
            }
        };
        let state = open.add();
        let open = open.clone();
        let conn = Connection {
            http: http.clone(),
            shared: shared.clone(),
            stop: stop_rx.clone(),
            state: state.clone(),
        };
        let Some(place) = DedicatedPlace::take(&dedicated) else {
            tokio::spawn(async move {
                serve_connection(stream, conn, false).await;
                open.remove(&state);
                drop(slot);
            });
            continue;
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                warn!("cannot take over a connection: {err}");
                open.remove(&state);
                continue;
            }
        };
        let (registry, registered) = (open.clone(), state.clone());
        let spawned = std::thread::Builder::new()
            .name("connection".into())
            .stack_size(CONNECTION_STACK)
            .spawn(move || {
                serve_on_this_thread(stream, conn);
                open.remove(&state);
                drop(slot);
                drop(place);
            });
        if let Err(err) = spawned {
            // Its slot, place and stream went with the closure: the client sees it close.
            registry.remove(&registered);
            warn!("cannot start a thread for a connection: {err}");
        }
    };

    notify(NotifyState::Stopping);
    drop(listener);
    let _ = stop_tx.send(true);
    let all = u32::try_from(limit).expect("the connection limit fits in u32");
    if tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all))
        .await
        .is_err()
    {
        warn!(
            "{} connections still open after {}, stopping anyway",
            limit - slots.available_permits(),
            humantime::format_duration(DRAIN_TIMEOUT)
        );
    }
    result
}

/// Raises this process's soft limit on open descriptors to its hard limit, as Go programs
/// (dockerd) do: systemd starts services with a soft limit of 1024, to be shared by the
/// connections and the driver's files. Returns the soft limit in force.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(err) = setrlimit(Resource::Nofile, raised) {
            warn!("cannot raise the limit on open files: {err}");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// [`MAX_CONNECTIONS`], or half the descriptors this process may open if that is less.
fn connection_limit() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let half = soft.map_or(usize::MAX, |n| usize::try_from(n / 2).unwrap_or(usize::MAX));
    MAX_CONNECTIONS.min(half).max(1)
}

/// The connections being served, oldest first, for [`OpenConnections::evict_one`].
#[derive(Default)]
struct OpenConnections {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<ConnectionState>>>,
}

/// What the accept loop knows of one connection.
struct ConnectionState {
    id: u64,
    /// When its task first ran: hyper then read whatever the client had sent, and handed
    /// over a whole request at once.
    serving_since: std::sync::OnceLock<Instant>,
    /// Requests handed to the handler so far, and how many of them are still running.
    started: AtomicU64,
    running: AtomicUsize,
    /// When its last request ended.
    idle_since: Mutex<Instant>,
    /// Set (and `evict` notified) when the connection is to give up its slot.
    evicted: AtomicBool,
    evict: Notify,
}

impl OpenConnections {
    fn add(&self) -> Arc<ConnectionState> {
        let state = Arc::new(ConnectionState {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            serving_since: std::sync::OnceLock::new(),
            started: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        self.lock().insert(state.id, state.clone());
        state
    }

    fn remove(&self, state: &ConnectionState) {
        self.lock().remove(&state.id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ConnectionState>>> {
        lock_ignoring_poison(&self.open)
    }

    /// Tells one connection to close: the oldest that has not sent a whole request within
    /// [`EVICT_AFTER`] of being served (closed at once: no request of it ever reached the
    /// driver; one whose request waits unread because the daemon is busy is not served yet),
    /// else the oldest whose last request ended [`EVICT_AFTER`] ago or longer (closed
    /// gracefully: an idle keep-alive connection at once, one still writing its last reply
    /// after that). Says which, if any.
    fn evict_one(&self) -> Option<&'static str> {
        let open = self.lock();
        let candidates = || open.values().filter(|c| !c.evicted.load(Ordering::SeqCst));
        let (chosen, what) = match candidates().find(|c| {
            c.started.load(Ordering::SeqCst) == 0
                && c.serving_since
                    .get()
                    .is_some_and(|t| t.elapsed() >= EVICT_AFTER)
        }) {
            Some(c) => (c, "the oldest connection that sent no request"),
            None => (
                candidates().find(|c| {
                    c.started.load(Ordering::SeqCst) > 0
                        && c.running.load(Ordering::SeqCst) == 0
                        && lock_ignoring_poison(&c.idle_since).elapsed() >= EVICT_AFTER
                })?,
                "the oldest idle connection",
            ),
        };
        chosen.evicted.store(true, Ordering::SeqCst);
        chosen.evict.notify_one();
        Some(what)
    }
}

fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts a request as running on its connection until dropped.
struct Running(Arc<ConnectionState>);

impl Running {
    fn start(state: &Arc<ConnectionState>) -> Running {
        state.started.fetch_add(1, Ordering::SeqCst);
        state.running.fetch_add(1, Ordering::SeqCst);
        Running(state.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        *lock_ignoring_poison(&self.0.idle_since) = Instant::now();
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Errors `accept` can return while the listener is still fine (out of descriptors or memory,
/// a peer that gave up): wait and go on.
fn is_transient(err: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || err.raw_os_error().is_some_and(|code| {
        [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
            .iter()
            .any(|errno| errno.raw_os_error() == code)
    })
}

/// Connections served at once by threads of their own (see the module's doc).
pub const DEDICATED_THREADS: usize = 16;
/// Stack of such a thread: it also decodes the requests' JSON (serde recurses up to 128
/// levels deep); only the pages touched count.
const CONNECTION_STACK: usize = 2 * 1024 * 1024;

/// What serving one accepted connection needs besides its stream.
struct Connection {
    http: http1::Builder,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    state: Arc<ConnectionState>,
}

/// One of the [`DEDICATED_THREADS`] places; given back when dropped.
struct DedicatedPlace(Arc<AtomicUsize>);

impl DedicatedPlace {
    fn take(taken: &Arc<AtomicUsize>) -> Option<DedicatedPlace> {
        if taken.fetch_add(1, Ordering::SeqCst) >= DEDICATED_THREADS {
            taken.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(DedicatedPlace(taken.clone()))
    }
}

impl Drop for DedicatedPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves a connection until it ends, on this thread (which it blocks), with a runtime of its
/// own: its driver calls run right here.
fn serve_on_this_thread(stream: std::os::unix::net::UnixStream, conn: Connection) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            warn!("cannot serve a connection: {err}");
            return;
        }
    };
    runtime.block_on(async move {
        match UnixStream::from_std(stream) {
            Ok(stream) => serve_connection(stream, conn, true).await,
            Err(err) => warn!("cannot serve a connection: {err}"),
        }
    });
    // What the last answer left, if the connection ended before its task ran.
    after_answer::run_pending();
}

/// Serves one connection: on a thread of its own (`inline`: the driver's calls run on it) or
/// as a task of the accepting thread (they run on the blocking pool).
async fn serve_connection(stream: UnixStream, conn: Connection, inline: bool) {
    let Connection {
        http,
        shared,
        mut stop,
        state,
    } = conn;
    let _ = state.serving_since.set(Instant::now());
    // The peer's pid identifies the client (dockerd) whose mounts these are: see
    // `Driver::mount`. A peer in another pid namespace shows as no pid.
    let peer_pid = stream
        .peer_cred()
        .ok()
        .and_then(|cred| cred.pid())
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|&pid| pid != 0);
    let peer = Arc::new(wire::Peer::new(peer_pid));
    let service = {
        let state = state.clone();
        service_fn(move |request| {
            // Counted from the moment hyper hands the request over.
            let running = Running::start(&state);
            let shared = shared.clone();
            let peer = peer.clone();
            async move {
                let response = handle(&shared, request, peer, inline).await;
                drop(running);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let fd = stream.as_raw_fd();
    let mut connection = pin!(http.serve_connection(TokioIo::new(stream), service));
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = async { drop(stop.wait_for(|stop| *stop).await) } => {
                connection.as_mut().graceful_shutdown();
                break connection.await;
            }
            () = state.evict.notified() => {
                // SAFETY: the stream lives inside `connection`, which is not dropped yet.
                let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                if rustix::io::ioctl_fionread(socket).is_ok_and(|waiting| waiting > 0) {
                    // The client has sent something hyper has not read yet (the daemon is
                    // busy): it is about to be served, not silent.
                    state.evicted.store(false, Ordering::SeqCst);
                    continue;
                }
                if state.started.load(Ordering::SeqCst) == 0 {
                    // No request of it ever reached the handler: nothing is lost.
                    return;
                }
                connection.as_mut().graceful_shutdown();
                break connection.await;
            }
        }
    };
    if let Err(err) = result {
        debug!("connection ended: {}", wire::error_chain(&err));
    }
}

struct Shared {
    driver: Arc<Driver>,
    activity: Activity,
    body_timeout: Duration,
}

/// Requests in flight and when the last one ended, for the idle timeout.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        }
    }

    fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }

    fn last(&self) -> Instant {
        *self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Completes once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(timeout).await;
                continue;
            }
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline && self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Marks one request in flight until dropped.
struct InFlight<'a>(&'a Activity);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Error)]
#[error("the request handler failed: {0}")]
struct HandlerPanicked(String);

async fn handle(
    shared: &Shared,
    request: Request<Incoming>,
    peer: Arc<wire::Peer>,
    inline: bool,
) -> Response<Full<Bytes>> {
    let _in_flight = shared.activity.begin();
    // What the connection's previous answer left (it may hold the lock this request wants).
    after_answer::run_pending();
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let call = read_call(request, shared.body_timeout).await;
    // On the connection's own thread, the request's log lines are written once it is
    // answered, and the work the driver defers is done then (`after_answer`): by a task of
    // this thread's runtime, which runs when the connection waits for its next request, after
    // hyper wrote the answer. Held only from here on, where nothing awaits: lines of the
    // connection's other branches are never held back.
    let held = inline.then(logging::Held::begin);
    let deferral = inline.then(after_answer::Deferral::begin);
    let (what, reply) = match call {
        Ok(call) => {
            let what = call.to_string();
            let driver = shared.driver.clone();
            // A panic fails this request alone, as a 500.
            let run = move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    wire::execute_for(&driver, call, &peer)
                }))
                .unwrap_or_else(|panic| {
                    let what = (panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    Reply::error(500, &HandlerPanicked(what))
                })
            };
            // On the connection's own thread it blocks nothing else.
            let reply = if inline {
                run()
            } else {
                tokio::task::spawn_blocking(run)
                    .await
                    .unwrap_or_else(|err| Reply::error(500, &HandlerPanicked(err.to_string())))
            };
            (what, reply)
        }
        Err(err) => {
            let shown: String = path.chars().take(100).collect();
            (format!("{method} {shown:?}"), err.reply())
        }
    };
    // 404 is what dockerd's Get probe before every Create gets: not worth a line at info.
    let level = match reply.status {
        500.. => Level::Warn,
        404 => Level::Debug,
        400.. => Level::Info,
        _ => Level::Debug,
    };
    let elapsed = started.elapsed();
    match reply.error_message() {
        Some(err) => log!(level, "{what}: {} in {elapsed:.1?}: {err}", reply.status),
        None => log!(level, "{what}: {} in {elapsed:.1?}", reply.status),
    }
    if let Some(held) = held {
        let lines = held.release();
        if !lines.is_empty() {
            after_answer::defer(move || logging::write_lines(&lines));
        }
    }
    if deferral.is_some_and(after_answer::Deferral::end) {
        tokio::spawn(async { after_answer::run_pending() });
    }
    to_response(reply)
}

/// Checks the method, reads the body (bounded in size and time) and decodes the call.
async fn read_call(request: Request<Incoming>, body_timeout: Duration) -> Result<Call, WireError> {
    if request.method() != Method::POST {
        return Err(WireError::MethodNotAllowed {
            method: request.method().as_str().chars().take(20).collect(),
        });
    }
    let path = request.uri().path().to_owned();
    if !wire::is_endpoint(&path) {
        return wire::parse(&path, b"");
    }
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return Err(WireError::BodyTooLarge { limit: MAX_BODY });
    }
    let reserve = declared.map_or(0, |len| len as usize);
    let body =
        match tokio::time::timeout(body_timeout, read_body(request.into_body(), reserve)).await {
            Err(_) => return Err(WireError::BodyTimeout),
            Ok(body) => body?,
        };
    wire::parse(&path, &body)
}

/// The body, at most [`MAX_BODY`] bytes; `reserve`: its declared length (checked against
/// the limit), allocated at once. Each piece is copied out as it arrives: a piece keeps the
/// whole buffer it was read into alive, so a body sent a byte at a time would otherwise hold
/// kilobytes per byte.
async fn read_body(mut body: Incoming, reserve: usize) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(reserve.min(MAX_BODY));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| WireError::BodyRead {
            source: Box::new(err),
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_BODY {
                return Err(WireError::BodyTooLarge { limit: MAX_BODY });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

fn to_response(reply: Reply) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = reply.encode();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(wire::CONTENT_TYPE));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("POST"));
    }
    response
}

/// Tells systemd about a state change; does nothing when not run by systemd.
pub fn notify(state: NotifyState<'_>) {
    if let Err(err) = sd_notify::notify(std::slice::from_ref(&state)) {
        warn!("cannot notify systemd of {state}: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_takes_silent_then_idle_connections_never_busy_or_young_ones() {
        let open = OpenConnections::default();
        let long_ago = Instant::now() - EVICT_AFTER * 2;
        let busy = open.add();
        let _ = busy.serving_since.set(long_ago);
        let running = Running::start(&busy);
        let idle = open.add();
        let _ = idle.serving_since.set(long_ago);
        drop(Running::start(&idle));
        *idle.idle_since.lock().unwrap() = long_ago;
        let young = open.add();
        let _ = young.serving_since.set(Instant::now());
        let not_served = open.add();
        let silent = open.add();
        let _ = silent.serving_since.set(long_ago);

        // Silent ones first, even when younger than an idle one.
        assert!(open.evict_one().unwrap().contains("sent no request"));
        assert!(silent.evicted.load(Ordering::SeqCst));
        assert!(open.evict_one().unwrap().contains("idle"));
        assert!(idle.evicted.load(Ordering::SeqCst));
        // Nothing else may go: one is busy, one sent nothing for less than EVICT_AFTER, one
        // is not served yet (its request may be waiting to be read).
        assert_eq!(open.evict_one(), None);
        for c in [&busy, &young, &not_served] {
            assert!(!c.evicted.load(Ordering::SeqCst));
        }
        // A request that ended just now keeps its connection a while.
        drop(running);
        assert_eq!(open.evict_one(), None);
        open.remove(&busy);
        assert_eq!(open.lock().len(), 4);
    }

    #[tokio::test]
    async fn idle_waits_for_requests_to_end() {
        let activity = Activity::new();
        let timeout = Duration::from_millis(200);
        let started = Instant::now();
        let guard = activity.begin();
        let mut idle = pin!(activity.idle_for(timeout));
        tokio::select! {
            () = &mut idle => panic!("idle while a request is in flight"),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        drop(guard);
        idle.await;
        assert!(started.elapsed() >= Duration::from_millis(700));
    }
}
