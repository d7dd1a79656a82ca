//! The HTTP transport: the plugin socket, the accept loop, graceful shutdown and idle exit.
//!
//! [`listen`] acquires the unix socket (from systemd, or by creating it); [`serve`] answers
//! HTTP/1.1 on it with an axum [`Router`] of the plugin's endpoints. A handler reads the body
//! (bounded in size and time), hands the path and the bytes to [`crate::wire`], runs the decoded
//! call on the driver and sends what `wire` made of the result. This module must not interpret
//! requests or know about volumes, files or mounts: everything it answers comes from `wire`, and
//! every answer, errors included, is JSON.
//!
//! It also keeps what protects the daemon from its clients: limits on a request's head and body
//! and on the time taken to send them, and a bound on open connections under which connections
//! that send nothing cannot lock dockerd out. The accept loop is our own (not `axum::serve`)
//! because axum has no setting for these, and because each connection's peer credentials name
//! the client (dockerd) its requests come from.

use std::future::{Future, pending};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{Level, debug, info, log, warn};
use sd_notify::NotifyState;
use thiserror::Error;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::driver::Driver;
use crate::wire::{self, Call, Peer, Reply, WireError};

mod socket;
pub use socket::{Listening, SocketFile, listen};

/// Largest request body read; larger ones are answered 413. dockerd's largest, a Create with
/// a base path of `PATH_MAX` bytes, is a few KiB.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest request head (request line and headers) hyper buffers; a larger one is answered
/// 431. What a connection can make the daemon hold is bounded by this and [`MAX_BODY`].
pub const MAX_HEAD: usize = 16 * 1024;
/// Connections served at once (fewer when the descriptor limit is low: half of it, the
/// driver needs the rest); further ones wait in the listen queue. When all are taken, the
/// connections that have had no request running for [`EVICT_AFTER`] are closed: connections
/// that send nothing cannot lock dockerd out.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a connection must have been without a request running (since it was accepted, or
/// since its last request ended) before it is closed to make room when all are taken. dockerd
/// sends its request as soon as it connects; a connection whose next request is waiting to be
/// read is never closed.
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
/// finish the request it is on (for at most [`DRAIN_TIMEOUT`], or until `hurry` completes)
/// and returns. The caller tells systemd it is ready before calling this. Queries run on the
/// runtime's own thread and calls that change state on its blocking pool (see `run`). Errors
/// only when accepting fails persistently.
pub async fn serve(
    listener: UnixListener,
    driver: Arc<Driver>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> io::Result<()> {
    let body_timeout = opts.read_timeout.unwrap_or(BODY_READ_TIMEOUT);
    let app = router(Arc::new(Shared {
        driver,
        body_timeout,
    }));
    let activity = Arc::new(Activity::new());
    let limit = connection_limit();
    let slots = Arc::new(Semaphore::new(limit));
    let crowded = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(opts.read_timeout.unwrap_or(HEADER_READ_TIMEOUT))
        .max_buf_size(MAX_HEAD)
        // A client that shuts its side down after its request (`nc -N`, socat, many
        // scripts) still gets the answer: the call it asked for runs either way.
        .half_close(true);

    let mut shutdown = pin!(shutdown);
    let mut idle = pin!(async {
        match opts.idle_timeout {
            Some(timeout) => {
                activity.idle_for(timeout).await;
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
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                debug!("all {limit} connection slots are taken: closing idle connections");
                loop {
                    // Asked again and again: a connection idle for less than EVICT_AFTER now
                    // may have been so for longer at the next asking.
                    crowded.notify_waiters();
                    tokio::select! {
                        () = &mut shutdown => break 'accept Ok(()),
                        () = &mut idle => break 'accept Ok(()),
                        slot = slots.clone().acquire_owned() => {
                            break slot.expect("the semaphore is never closed");
                        }
                        () = tokio::time::sleep(EVICT_AFTER / 5) => {}
                    }
                }
            }
        };
        let conn = Connection {
            http: http.clone(),
            app: app.clone(),
            activity: activity.clone(),
            stop: stop_rx.clone(),
            crowded: crowded.clone(),
        };
        tokio::spawn(async move {
            conn.serve(stream).await;
            drop(slot);
        });
    };

    notify(NotifyState::Stopping);
    drop(listener);
    let _ = stop_tx.send(true);
    let all = u32::try_from(limit).expect("the connection limit fits in u32");
    let open = || limit - slots.available_permits();
    tokio::select! {
        drained = tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all)) => {
            if drained.is_err() {
                warn!(
                    "{} connections still open after {}, stopping anyway",
                    open(),
                    humantime::format_duration(DRAIN_TIMEOUT)
                );
            }
        }
        () = hurry => {
            let n = open();
            let plural = if n == 1 { "" } else { "s" };
            warn!("signalled again: stopping without waiting for {n} open connection{plural}");
        }
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

/// Requests running and when the last one ended: the daemon's, for the idle exit, and each
/// connection's, for making room when all connections are taken.
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

    fn begin(self: &Arc<Self>) -> Running {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Running(self.clone())
    }

    fn last(&self) -> Instant {
        *self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a request is running.
    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0
    }

    /// Whether no request has run for `time` (or since this began, if none ever did).
    fn idle_for_at_least(&self, time: Duration) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 && self.last().elapsed() >= time
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

/// Counts one request as running until dropped.
struct Running(Arc<Activity>);

impl Drop for Running {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What serving one accepted connection needs besides its stream.
struct Connection {
    http: http1::Builder,
    app: Router,
    /// The daemon's: every request counts for the idle exit.
    activity: Arc<Activity>,
    stop: watch::Receiver<bool>,
    /// Notified while all connection slots are taken.
    crowded: Arc<Notify>,
}

impl Connection {
    /// Serves the connection until the client closes it, shutdown (then it finishes the
    /// request it is on), or, while all slots are taken, [`EVICT_AFTER`] without a request.
    async fn serve(self, stream: UnixStream) {
        let Connection {
            http,
            app,
            activity,
            mut stop,
            crowded,
        } = self;
        // The peer's pid identifies the client (dockerd) whose mounts these are: see
        // `Driver::mount`. A peer in another pid namespace shows as no pid.
        let pid = (stream.peer_cred().ok())
            .and_then(|cred| cred.pid())
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|&pid| pid != 0);
        let peer = Arc::new(Peer::new(pid));
        let own = Arc::new(Activity::new());
        let service = {
            let own = own.clone();
            service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(peer.clone());
                // Counted from the moment hyper hands the request over until it is answered.
                let running = (activity.begin(), own.begin());
                let answer = app.clone().oneshot(request);
                async move {
                    let response = answer.await;
                    drop(running);
                    response
                }
            })
        };
        let fd = stream.as_raw_fd();
        let mut connection = pin!(http.serve_connection(TokioIo::new(stream), service));
        let result = loop {
            tokio::select! {
                result = connection.as_mut() => break result,
                () = async { drop(stop.wait_for(|stop| *stop).await) } => {
                    // hyper's graceful shutdown closes at once a connection it has read
                    // nothing from, and drops a request that waits unread in the socket: one
                    // sent before the stop, which its client will never send again. So hyper
                    // reads what is there first; then the shutdown finishes that request.
                    while has_unread(fd) && !own.busy() {
                        tokio::select! {
                            result = connection.as_mut() => {
                                if let Err(err) = result {
                                    debug!("connection ended: {}", wire::error_chain(&err));
                                }
                                return;
                            }
                            () = tokio::task::yield_now() => {}
                        }
                    }
                    connection.as_mut().graceful_shutdown();
                    break connection.await;
                }
                () = crowded.notified() => {
                    // Dropping it closes the socket: no request of it is running, and a
                    // request it has sent but hyper has not read yet (the daemon is busy)
                    // keeps it open. What hyper has read of a request's head is lost: a
                    // client sending a head that slowly is not dockerd.
                    if own.idle_for_at_least(EVICT_AFTER) && !has_unread(fd) {
                        debug!("closing a connection without a request to make room");
                        return;
                    }
                }
            }
        };
        if let Err(err) = result {
            debug!("connection ended: {}", wire::error_chain(&err));
        }
    }
}

/// Whether bytes the client sent on `fd` wait in the socket, unread.
fn has_unread(fd: RawFd) -> bool {
    // SAFETY: called while the connection that owns the socket is alive.
    let socket = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::ioctl_fionread(socket).is_ok_and(|waiting| waiting > 0)
}

struct Shared {
    driver: Arc<Driver>,
    body_timeout: Duration,
}

/// The nine endpoints, each a POST; any other path or method gets [`refuse`]'s JSON error.
fn router(shared: Arc<Shared>) -> Router {
    let mut router = Router::new();
    for endpoint in wire::ENDPOINTS {
        router = router.route(endpoint, post(call));
    }
    router
        .fallback(refuse)
        .method_not_allowed_fallback(refuse)
        .with_state(shared)
}

/// An endpoint: reads the body, decodes it and runs the call.
async fn call(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let decoded = match read_body(&parts.headers, body, shared.body_timeout).await {
        Ok(body) => wire::parse(path, &body),
        Err(err) => Err(err),
    };
    match decoded {
        Ok(call) => {
            let what = call.to_string();
            // Set on every connection's requests by `Connection::serve`.
            let peer = parts.extensions.get::<Arc<Peer>>().cloned();
            let reply = run(shared.driver.clone(), call, peer.unwrap_or_default()).await;
            answer(&what, started, reply)
        }
        Err(err) => answer(&shown(&parts.method, path), started, err.reply()),
    }
}

/// Any other path (404) or method (405): refused before reading a body, the method first.
async fn refuse(method: Method, uri: Uri) -> Response {
    let started = Instant::now();
    let err = if method == Method::POST {
        WireError::unknown_endpoint(uri.path())
    } else {
        WireError::method_not_allowed(method.as_str())
    };
    answer(&shown(&method, uri.path()), started, err.reply())
}

/// A request that decoded to no call, for the log: its method and (the start of) its path.
fn shown(method: &Method, path: &str) -> String {
    let path: String = path.chars().take(100).collect();
    format!("{method} {path:?}")
}

/// The body, at most [`MAX_BODY`] bytes, all of it within `timeout` (tower-http's body
/// timeout is per piece: a body trickled in would have no bound). Each piece is copied out as
/// it arrives (not axum's `Bytes` extractor, which keeps them): a piece keeps the whole buffer
/// it was read into alive, so a body sent a byte at a time would otherwise hold kilobytes per
/// byte.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    timeout: Duration,
) -> Result<Vec<u8>, WireError> {
    let declared = (headers.get(CONTENT_LENGTH))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return Err(WireError::BodyTooLarge { limit: MAX_BODY });
    }
    let read = async {
        let mut body = body;
        let mut out = Vec::with_capacity(declared.map_or(0, |len| len as usize));
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
    };
    (tokio::time::timeout(timeout, read).await).unwrap_or(Err(WireError::BodyTimeout))
}

#[derive(Debug, Error)]
#[error("the request handler failed: {0}")]
struct HandlerPanicked(String);

/// Runs `call` on the driver, which blocks. A query (Get, Path, List, ...) only looks at a few
/// files: it runs right here, on the runtime's thread, because handing it to another thread and
/// back costs more than it does. A call that changes state (Create, Remove, Mount, Unmount) may
/// wait for the disk (fsync, an unmount's sync): it runs on the blocking pool, so that calls of
/// several clients wait side by side and the runtime keeps serving meanwhile. A panic fails
/// this request alone, as a 500.
async fn run(driver: Arc<Driver>, call: Call, peer: Arc<Peer>) -> Reply {
    let changes_state = call.changes_state();
    let work = move || {
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
    if !changes_state {
        return work();
    }
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Reply::error(500, &HandlerPanicked(e.to_string())))
}

/// Logs the request (level by status, with its duration) and encodes the reply.
fn answer(what: &str, started: Instant, reply: Reply) -> Response {
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
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = HeaderValue::from_static(wire::CONTENT_TYPE);
    let mut response = (status, [(CONTENT_TYPE, content_type)], reply.encode()).into_response();
    if status == StatusCode::METHOD_NOT_ALLOWED {
        (response.headers_mut()).insert(ALLOW, HeaderValue::from_static("POST"));
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

    /// The router as dockerd meets it: a request through it, and what comes back.
    async fn exchange(app: &Router, method: &str, path: &str, body: &'static [u8]) -> Response {
        let request = Request::builder().method(method).uri(path);
        app.clone()
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap()
    }

    async fn json_of(response: Response) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn every_answer_is_json_errors_included() {
        let dir = tempfile::tempdir().unwrap();
        let driver = Driver::with_sys(&dir.path().join("root"), Default::default()).unwrap();
        let app = router(Arc::new(Shared {
            driver: Arc::new(driver),
            body_timeout: Duration::from_secs(1),
        }));
        let cases: [(&str, &str, &[u8], u16); 9] = [
            // dockerd's argument-less calls: no Content-Type, an empty body.
            ("POST", wire::ACTIVATE, b"", 200),
            ("POST", wire::LIST, b"", 200),
            ("POST", wire::GET, br#"{"Name":"nope"}"#, 404),
            ("POST", wire::CREATE, b"{", 400),
            ("POST", "/VolumeDriver.Nope", b"{}", 404),
            ("GET", wire::LIST, b"", 405),
            ("HEAD", wire::LIST, b"", 405),
            // The method is refused first, as before the router.
            ("PUT", "/nowhere", b"", 405),
            ("POST", wire::GET, &[b' '; MAX_BODY + 1], 413),
        ];
        for (method, path, body, status) in cases {
            let response = exchange(&app, method, path, body).await;
            assert_eq!(response.status(), status, "{method} {path}");
            let headers = response.headers();
            assert_eq!(headers[CONTENT_TYPE], wire::CONTENT_TYPE, "{method} {path}");
            if status == 405 {
                assert_eq!(headers[ALLOW], "POST", "{method} {path}");
            }
            if method == "HEAD" {
                continue;
            }
            let body = json_of(response).await;
            let err = body.get("Err").and_then(|e| e.as_str());
            assert_eq!(status == 200, err.is_none(), "{method} {path}: {body}");
            assert!(err.is_none_or(|e| !e.is_empty()), "{method} {path}: {body}");
        }
        let body = json_of(exchange(&app, "POST", wire::ACTIVATE, b"").await).await;
        assert_eq!(body, serde_json::json!({ "Implements": ["VolumeDriver"] }));
    }

    /// A body of one byte every 100 ms: each piece in time, the whole never.
    struct Trickle(std::pin::Pin<Box<tokio::time::Sleep>>);

    impl hyper::body::Body for Trickle {
        type Data = hyper::body::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
            std::task::ready!(self.0.as_mut().poll(cx));
            let next = Instant::now() + Duration::from_millis(100);
            self.0.as_mut().reset(next);
            let data = hyper::body::Bytes::from_static(b" ");
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(data))))
        }
    }

    #[tokio::test]
    async fn a_body_must_arrive_whole_within_the_timeout() {
        let body = Body::new(Trickle(Box::pin(tokio::time::sleep(Duration::ZERO))));
        let started = Instant::now();
        let result = read_body(&HeaderMap::new(), body, Duration::from_millis(500)).await;
        assert!(matches!(result, Err(WireError::BodyTimeout)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn idle_waits_for_requests_to_end() {
        let activity = Arc::new(Activity::new());
        let timeout = Duration::from_millis(200);
        let started = Instant::now();
        let running = activity.begin();
        assert!(!activity.idle_for_at_least(Duration::ZERO));
        let mut idle = pin!(activity.idle_for(timeout));
        tokio::select! {
            () = &mut idle => panic!("idle while a request is in flight"),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        drop(running);
        assert!(!activity.idle_for_at_least(timeout));
        idle.await;
        assert!(activity.idle_for_at_least(timeout));
        assert!(started.elapsed() >= Duration::from_millis(700));
    }
}
