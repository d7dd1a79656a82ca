//! Docker's volume plugin protocol: request bodies in, [`Call`]s out; driver results in, JSON
//! replies out.
//!
//! This module is pure: [`parse`] decodes one request (endpoint path and body bytes) into a
//! [`Call`] whose names are already validated, and [`execute`] runs a call against the
//! [`Driver`] and encodes the answer as a [`Reply`] (an HTTP status and a JSON body). It must
//! not do I/O of its own, know about files or mounts, or make decisions that belong to the
//! driver; the HTTP transport lives in [`crate::server`].
//!
//! The protocol, as dockerd speaks it: every call is a POST with no `Content-Type`; the
//! argument-less calls (`/Plugin.Activate`, `/VolumeDriver.Capabilities`, `/VolumeDriver.List`)
//! have an empty body; every reply is JSON and every error is `{"Err": "message"}`.

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value, json};
use thiserror::Error;

use crate::driver::{Driver, DriverError, VolumeInfo};
use crate::names::{MountId, NameError, VolumeName};
use crate::sys::Sys;

pub const ACTIVATE: &str = "/Plugin.Activate";
pub const CAPABILITIES: &str = "/VolumeDriver.Capabilities";
pub const CREATE: &str = "/VolumeDriver.Create";
pub const REMOVE: &str = "/VolumeDriver.Remove";
pub const MOUNT: &str = "/VolumeDriver.Mount";
pub const UNMOUNT: &str = "/VolumeDriver.Unmount";
pub const PATH: &str = "/VolumeDriver.Path";
pub const GET: &str = "/VolumeDriver.Get";
pub const LIST: &str = "/VolumeDriver.List";

/// Every endpoint this plugin answers.
pub const ENDPOINTS: [&str; 9] = [
    ACTIVATE,
    CAPABILITIES,
    CREATE,
    REMOVE,
    MOUNT,
    UNMOUNT,
    PATH,
    GET,
    LIST,
];

/// The `Content-Type` of every reply (the one Docker's plugin helpers use).
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.1+json";

/// One decoded plugin call, with validated names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Activate,
    Capabilities,
    Create {
        name: VolumeName,
        options: BTreeMap<String, String>,
    },
    Remove {
        name: VolumeName,
    },
    Mount {
        name: VolumeName,
        id: MountId,
    },
    Unmount {
        name: VolumeName,
        id: MountId,
    },
    Path {
        name: VolumeName,
    },
    Get {
        name: VolumeName,
    },
    List,
}

impl Call {
    /// The endpoint path this call arrived on.
    /// Whether the call changes the state on disk or in the kernel (and may wait for either).
    pub fn changes_state(&self) -> bool {
        matches!(
            self,
            Call::Create { .. } | Call::Remove { .. } | Call::Mount { .. } | Call::Unmount { .. }
        )
    }

    pub fn endpoint(&self) -> &'static str {
        match self {
            Call::Activate => ACTIVATE,
            Call::Capabilities => CAPABILITIES,
            Call::Create { .. } => CREATE,
            Call::Remove { .. } => REMOVE,
            Call::Mount { .. } => MOUNT,
            Call::Unmount { .. } => UNMOUNT,
            Call::Path { .. } => PATH,
            Call::Get { .. } => GET,
            Call::List => LIST,
        }
    }

    /// The volume the call is about, if any.
    pub fn volume(&self) -> Option<&VolumeName> {
        match self {
            Call::Create { name, .. }
            | Call::Remove { name }
            | Call::Mount { name, .. }
            | Call::Unmount { name, .. }
            | Call::Path { name }
            | Call::Get { name } => Some(name),
            Call::Activate | Call::Capabilities | Call::List => None,
        }
    }
}

/// For logs: the endpoint, the volume and the mount ID (never the options' values).
impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.endpoint())?;
        if let Some(name) = self.volume() {
            write!(f, " {name}")?;
        }
        if let Call::Mount { id, .. } | Call::Unmount { id, .. } = self {
            write!(f, " id={id}")?;
        }
        Ok(())
    }
}

/// Why a request was refused before it reached the driver.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("no such endpoint {path:?}")]
    UnknownEndpoint { path: String },
    #[error("method {method} is not allowed, plugin calls are POST")]
    MethodNotAllowed { method: String },
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("timed out reading the request body")]
    BodyTimeout,
    #[error("cannot read the request body")]
    BodyRead {
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
    #[error("malformed request body for {endpoint}")]
    Json {
        endpoint: &'static str,
        #[source]
        source: JsonError,
    },
    #[error("invalid request to {endpoint}")]
    Name {
        endpoint: &'static str,
        #[source]
        source: NameError,
    },
}

/// Why a body is not the JSON expected: serde's message, shortened. serde quotes an
/// unexpected string whole ("invalid type: string \"...\""), and a hostile 1 MiB value must
/// not come back in the reply, nor go to the log.
#[derive(Debug)]
pub struct JsonError(String);

impl JsonError {
    /// Longest message kept, in characters; the middle of a longer one is cut.
    pub const MAX_CHARS: usize = 300;
}

impl From<serde_json::Error> for JsonError {
    fn from(err: serde_json::Error) -> Self {
        JsonError(shorten(&err.to_string(), JsonError::MAX_CHARS))
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for JsonError {}

/// `text` if it has at most `max` characters; else its start and its end (where serde puts
/// what was expected, and the position) around " ... ".
fn shorten(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.to_owned();
    }
    let head_len = max * 2 / 3;
    let head: String = text.chars().take(head_len).collect();
    let tail: String = text.chars().skip(count - (max - head_len)).collect();
    format!("{head} ... {tail}")
}

impl WireError {
    /// `path` is no endpoint; only its start is kept (it may be kilobytes long).
    pub fn unknown_endpoint(path: &str) -> WireError {
        WireError::UnknownEndpoint {
            path: path.chars().take(100).collect(),
        }
    }

    /// `method` is not POST; only its start is kept.
    pub fn method_not_allowed(method: &str) -> WireError {
        WireError::MethodNotAllowed {
            method: method.chars().take(20).collect(),
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            WireError::UnknownEndpoint { .. } => 404,
            WireError::MethodNotAllowed { .. } => 405,
            WireError::BodyTimeout => 408,
            WireError::BodyTooLarge { .. } => 413,
            WireError::BodyRead { .. } | WireError::Json { .. } | WireError::Name { .. } => 400,
        }
    }

    /// The error reply for this error.
    pub fn reply(&self) -> Reply {
        Reply::error(self.status(), self)
    }
}

/// An answer: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    /// The body; `Null` for one encoded directly ([`Reply::encode`] has it).
    pub body: Value,
    encoded: Option<Vec<u8>>,
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply {
            status: 200,
            body,
            encoded: None,
        }
    }

    /// The body as sent.
    pub fn encode(self) -> Vec<u8> {
        match self.encoded {
            Some(bytes) => bytes,
            None => serde_json::to_vec(&self.body).expect("a JSON value always serialises"),
        }
    }

    /// Longest `Err` message, in characters: room for a few paths of `PATH_MAX` bytes. A
    /// longer one (an option value of a hostile request quoted in it) has its middle cut.
    pub const MAX_ERROR_CHARS: usize = 16 * 1024;

    /// `{"Err": "<err and its causes>"}` with `status`.
    pub fn error(status: u16, err: &dyn Error) -> Reply {
        Reply {
            status,
            body: json!({ "Err": shorten(&error_chain(err), Reply::MAX_ERROR_CHARS) }),
            encoded: None,
        }
    }

    /// The `Err` message, if this is an error reply.
    pub fn error_message(&self) -> Option<&str> {
        self.body.get("Err").and_then(Value::as_str)
    }
}

pub use crate::error_chain;

#[derive(Deserialize)]
#[serde(expecting = "an object with a string \"Name\"")]
struct NameBody {
    #[serde(rename = "Name")]
    name: String,
}

#[derive(Deserialize)]
#[serde(expecting = "an object with a string \"Name\" and an object \"Opts\"")]
struct CreateBody {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Opts", default)]
    opts: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(expecting = "an object with strings \"Name\" and \"ID\"")]
struct MountBody {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "ID")]
    id: String,
}

/// Decodes a JSON object into `T`. Derived `Deserialize` would also take an array, reading its
/// elements as the fields in order; dockerd only ever sends objects. A key named twice in one
/// object is refused: which of the two a reader takes differs between JSON parsers (a `Value`
/// keeps the last, silently), so such a request means nothing certain.
fn object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice::<UniqueKeys>(body)?;
    match serde_json::from_slice::<Value>(body)? {
        value @ Value::Object(_) => serde_json::from_value(value),
        _ => Err(serde::de::Error::custom("the body must be a JSON object")),
    }
}

/// Any JSON value in which no object names a key twice (keys compared once unescaped).
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<UniqueKeys>()?;
            if seen.contains(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "key {key:?} appears twice in one object"
                )));
            }
            seen.insert(key);
        }
        Ok(self)
    }
}

/// Decodes one request: `path` is the URL path (`/VolumeDriver.Mount`), `body` the raw body.
/// Unknown JSON fields are ignored; no `Content-Type` is required.
pub fn parse(path: &str, body: &[u8]) -> Result<Call, WireError> {
    let Some(&endpoint) = ENDPOINTS.iter().find(|e| **e == path) else {
        return Err(WireError::unknown_endpoint(path));
    };
    let json = |source: serde_json::Error| WireError::Json {
        endpoint,
        source: source.into(),
    };
    let name =
        |raw: &str| VolumeName::parse(raw).map_err(|source| WireError::Name { endpoint, source });
    let id = |raw: &str| MountId::parse(raw).map_err(|source| WireError::Name { endpoint, source });
    let no_arguments = || {
        if body.trim_ascii().is_empty() {
            Ok(())
        } else {
            serde_json::from_slice::<IgnoredAny>(body)
                .map(drop)
                .map_err(json)
        }
    };
    let call = match endpoint {
        ACTIVATE => no_arguments().map(|()| Call::Activate)?,
        CAPABILITIES => no_arguments().map(|()| Call::Capabilities)?,
        LIST => no_arguments().map(|()| Call::List)?,
        CREATE => {
            let b: CreateBody = object(body).map_err(json)?;
            Call::Create {
                name: name(&b.name)?,
                options: b.opts.unwrap_or_default(),
            }
        }
        MOUNT | UNMOUNT => {
            let b: MountBody = object(body).map_err(json)?;
            let (name, id) = (name(&b.name)?, id(&b.id)?);
            if endpoint == MOUNT {
                Call::Mount { name, id }
            } else {
                Call::Unmount { name, id }
            }
        }
        _ => {
            let b: NameBody = object(body).map_err(json)?;
            let name = name(&b.name)?;
            match endpoint {
                REMOVE => Call::Remove { name },
                PATH => Call::Path { name },
                _ => Call::Get { name },
            }
        }
    };
    Ok(call)
}

/// The process at the other end of a connection, from its peer credentials: the client a
/// Mount's record names. Identified (its start time read) once, at its first Mount, and kept
/// for the connection's life.
#[derive(Debug, Default)]
pub struct Peer {
    pid: Option<u32>,
    client: std::sync::OnceLock<Option<crate::store::Client>>,
}

impl Peer {
    pub fn new(pid: Option<u32>) -> Peer {
        Peer {
            pid,
            client: std::sync::OnceLock::new(),
        }
    }

    fn client<S: Sys>(&self, driver: &Driver<S>) -> Option<crate::store::Client> {
        *self.client.get_or_init(|| driver.client(self.pid))
    }
}

/// Runs `call` against `driver` and encodes the answer; `peer_pid` is the calling process,
/// from the connection's peer credentials. Blocks for as long as the driver does: call it from
/// a blocking thread.
pub fn execute<S: Sys>(driver: &Driver<S>, call: Call, peer_pid: Option<u32>) -> Reply {
    execute_for(driver, call, &Peer::new(peer_pid))
}

/// [`execute`] for a connection's [`Peer`], which remembers who it is across calls.
pub fn execute_for<S: Sys>(driver: &Driver<S>, call: Call, peer: &Peer) -> Reply {
    let result = match &call {
        Call::Activate => Ok(json!({ "Implements": ["VolumeDriver"] })),
        Call::Capabilities => Ok(json!({ "Capabilities": { "Scope": "local" } })),
        Call::Create { name, options } => driver.create(name, options).map(|()| json!({})),
        Call::Remove { name } => driver.remove(name).map(|()| json!({})),
        Call::Mount { name, id } => driver
            .mount_as(name, id, peer.client(driver))
            .map(|mountpoint| json!({ "Mountpoint": path_text(&mountpoint) })),
        Call::Unmount { name, id } => driver.unmount(name, id).map(|()| json!({})),
        Call::Path { name } => driver.path(name).map(|mountpoint| {
            json!({ "Mountpoint": mountpoint.as_deref().map(path_text).unwrap_or_default() })
        }),
        Call::Get { name } => driver
            .get(name)
            .map(|info| json!({ "Volume": volume_json(&info) })),
        Call::List => {
            return match driver.list() {
                Ok(names) => list_reply(&names),
                Err(err) => Reply::error(driver_status(&err), &err),
            };
        }
    };
    match result {
        Ok(body) => Reply::ok(body),
        Err(err) => Reply::error(driver_status(&err), &err),
    }
}

/// The HTTP status of a driver error. dockerd and Podman fail on any status but 200 and show
/// the `Err` text; the status tells the log whose fault it is: the request's (4xx, logged at
/// info) or the host's (500, a warning).
fn driver_status(err: &DriverError) -> u16 {
    match err {
        // dockerd asks Get before every Create: a missing volume is an everyday answer.
        DriverError::NoSuchVolume(_) => 404,
        DriverError::Options { .. } | DriverError::BaseInVolume { .. } => 400,
        DriverError::BaseRefused { .. } => 403,
        // The volume's state refuses the request (its options, its mounts, its users): the
        // request may pass once that changes.
        DriverError::Conflict { .. }
        | DriverError::UnknownMountId { .. }
        | DriverError::HeldElsewhere { .. }
        | DriverError::Busy { .. }
        | DriverError::Mounted { .. } => 409,
        DriverError::Mount { .. }
        | DriverError::Image { .. }
        | DriverError::Unmount { .. }
        | DriverError::Inspect { .. }
        | DriverError::CutOff { .. }
        | DriverError::BaseGone { .. }
        | DriverError::Io { .. }
        | DriverError::Root { .. } => 500,
    }
}

/// `{"Volumes": [{"Name": ...}, ...]}`, written straight into its bytes: for thousands of
/// volumes a `Value` tree costs a map per volume, megabytes and milliseconds. Volume names
/// need no JSON escaping (letters, digits, `_`, `.` and `-`).
fn list_reply(names: &[VolumeName]) -> Reply {
    let size = names.iter().map(|n| n.as_str().len() + 12).sum::<usize>() + 16;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(b"{\"Volumes\":[");
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"Name\":\"");
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b"\"}");
    }
    out.extend_from_slice(b"]}");
    Reply {
        status: 200,
        body: Value::Null,
        encoded: Some(out),
    }
}

/// The `Volume` object of a `Get` reply. `Mountpoint` only while mounted; `Status` is what
/// `docker volume inspect` prints verbatim.
pub fn volume_json(info: &VolumeInfo) -> Value {
    let mut status = Map::new();
    if let Some(base) = &info.base {
        status.insert("Base".into(), path_text(base).into());
    }
    if let Some(volatile) = info.volatile {
        status.insert("Volatile".into(), volatile.into());
    }
    status.insert("Mounted".into(), info.mounted.into());
    status.insert("ActiveMounts".into(), info.active_mounts.into());
    status.insert("UpperDir".into(), path_text(&info.upper).into());
    if let Some(size) = &info.size {
        status.insert("Size".into(), size.cap.into());
        status.insert("Fs".into(), size.fs.name().into());
        // Known while the image is attached; after a reboot, once a Mount attached it.
        status.insert("Attached".into(), size.used.is_some().into());
        if let Some(used) = size.used {
            status.insert("Used".into(), used.into());
        }
    }
    if let Some(error) = &info.error {
        status.insert("Error".into(), error.as_str().into());
    }

    let mut volume = Map::new();
    volume.insert("Name".into(), info.name.as_str().into());
    if let Some(mountpoint) = &info.mountpoint {
        volume.insert("Mountpoint".into(), path_text(mountpoint).into());
    }
    volume.insert("CreatedAt".into(), rfc3339(info.created_at).into());
    volume.insert("Status".into(), status.into());
    volume.into()
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `2024-05-01T12:00:00Z`: what Go's `time.RFC3339` parses. Times outside 1970..=9999 are
/// clamped, because a `CreatedAt` dockerd cannot parse makes it forget the volume.
pub fn rfc3339(time: SystemTime) -> String {
    // 9999-12-31T23:59:59Z
    let last = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    let time = time.clamp(UNIX_EPOCH, last);
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests;
