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
/// elements as the fields in order; dockerd only ever sends objects.
fn object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    match serde_json::from_slice::<Value>(body)? {
        value @ Value::Object(_) => serde_json::from_value(value),
        _ => Err(serde::de::Error::custom("the body must be a JSON object")),
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
                Err(err) => Reply::error(500, &err),
            };
        }
    };
    match result {
        Ok(body) => Reply::ok(body),
        // dockerd asks Get before every Create: a missing volume is an everyday answer.
        Err(err @ DriverError::NoSuchVolume(_)) => Reply::error(404, &err),
        Err(err) => Reply::error(500, &err),
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

    fn vol(s: &str) -> VolumeName {
        VolumeName::parse(s).unwrap()
    }

    const ID: &str = "3f1c1b6a9f0e4a2b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b";

    #[test]
    fn list_is_encoded_as_its_json_would_be() {
        let names = [vol("a"), vol("B-1.x_y"), vol(&"z".repeat(255))];
        let body: Value = serde_json::from_slice(&list_reply(&names).encode()).unwrap();
        assert_eq!(
            body,
            json!({ "Volumes": [{ "Name": "a" }, { "Name": "B-1.x_y" }, { "Name": "z".repeat(255) }] })
        );
        let empty: Value = serde_json::from_slice(&list_reply(&[]).encode()).unwrap();
        assert_eq!(empty, json!({ "Volumes": [] }));
    }

    #[test]
    fn argumentless_calls_accept_dockerds_empty_body_and_any_json() {
        for (path, call) in [
            (ACTIVATE, Call::Activate),
            (CAPABILITIES, Call::Capabilities),
            (LIST, Call::List),
        ] {
            for body in [&b""[..], b"\n", b"{}", b"null", br#"{"x": [1, 2]}"#] {
                assert_eq!(parse(path, body).unwrap(), call, "{path} {body:?}");
            }
            let err = parse(path, b"{").unwrap_err();
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn create_with_dockerds_bodies() {
        let expect = |opts: &[(&str, &str)]| Call::Create {
            name: vol("v1"),
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(
            parse(
                CREATE,
                br#"{"Name":"v1","Opts":{"base":"/srv/data","volatile":"yes"}}"#
            )
            .unwrap(),
            expect(&[("base", "/srv/data"), ("volatile", "yes")])
        );
        assert_eq!(
            parse(CREATE, br#"{"Name":"v1","Opts":null}"#).unwrap(),
            expect(&[])
        );
        assert_eq!(parse(CREATE, br#"{"Name":"v1"}"#).unwrap(), expect(&[]));
        assert_eq!(
            parse(CREATE, br#"{"Name":"v1","Opts":{}}"#).unwrap(),
            expect(&[])
        );
        // Fields dockerd may add later are ignored.
        assert_eq!(
            parse(CREATE, br#"{"Name":"v1","Opts":{},"Labels":{"a":"b"}}"#).unwrap(),
            expect(&[])
        );
    }

    #[test]
    fn name_and_id_calls_with_dockerds_bodies() {
        assert_eq!(
            parse(REMOVE, br#"{"Name":"v1"}"#).unwrap(),
            Call::Remove { name: vol("v1") }
        );
        assert_eq!(
            parse(PATH, br#"{"Name":"v1"}"#).unwrap(),
            Call::Path { name: vol("v1") }
        );
        assert_eq!(
            parse(GET, br#"{"Name":"v1"}"#).unwrap(),
            Call::Get { name: vol("v1") }
        );
        let body = format!(r#"{{"Name":"v1","ID":"{ID}"}}"#);
        let id = MountId::parse(ID).unwrap();
        assert_eq!(
            parse(MOUNT, body.as_bytes()).unwrap(),
            Call::Mount {
                name: vol("v1"),
                id: id.clone()
            }
        );
        assert_eq!(
            parse(UNMOUNT, body.as_bytes()).unwrap(),
            Call::Unmount {
                name: vol("v1"),
                id
            }
        );
    }

    #[test]
    fn a_huge_value_of_the_wrong_type_is_not_echoed_whole() {
        let huge = "h".repeat(1 << 20);
        let body = serde_json::to_vec(&json!({ "Name": "v", "Opts": huge })).unwrap();
        let message = error_chain(&parse(CREATE, &body).unwrap_err());
        assert!(message.len() < 500, "{} bytes", message.len());
        assert!(
            message.starts_with(
                "malformed request body for /VolumeDriver.Create: invalid type: string \"hhh"
            ),
            "{message}"
        );
        assert!(message.ends_with("\", expected a map"), "{message}");

        let err = std::io::Error::other(format!("base {huge:?} is odd"));
        let reply = Reply::error(500, &err);
        let message = reply.error_message().unwrap();
        assert_eq!(message.chars().count(), Reply::MAX_ERROR_CHARS + 5);
        assert!(message.starts_with("base \"hhh") && message.ends_with("hhh\" is odd"));
    }

    #[test]
    fn malformed_bodies_are_bad_requests() {
        let cases: &[(&str, &[u8])] = &[
            (CREATE, b""),
            (CREATE, b"null"),
            (CREATE, b"[]"),
            (CREATE, b"{"),
            (CREATE, br#"{"Opts":{}}"#),
            (CREATE, br#"{"Name":1}"#),
            (CREATE, br#"{"Name":"v1","Opts":{"base":1}}"#),
            (CREATE, br#"{"Name":"v1","Opts":{"volatile":true}}"#),
            (CREATE, br#"{"Name":"v1","Opts":["base"]}"#),
            (CREATE, br#"{"Name":"v1"} trailing"#),
            (REMOVE, b""),
            (REMOVE, br#"{"name":"v1"}"#),
            (GET, br#"{"Name":null}"#),
            (PATH, b"\xff\xfe"),
            (MOUNT, br#"{"Name":"v1"}"#),
            (UNMOUNT, br#"{"ID":"abc"}"#),
            (MOUNT, br#"{"Name":"v1","ID":5}"#),
            // Arrays would otherwise be read as the fields in order.
            (CREATE, br#"["v1",{"base":"/srv"}]"#),
            (MOUNT, br#"["v1","abc"]"#),
            (REMOVE, br#"["v1"]"#),
            (GET, br#"["v1"]"#),
        ];
        for (path, body) in cases {
            let err = parse(path, body).unwrap_err();
            assert!(
                matches!(err, WireError::Json { .. }),
                "{path} {body:?}: {err:?}"
            );
            assert_eq!(err.status(), 400);
            let message = error_chain(&err);
            assert!(
                message.starts_with("malformed request body for /"),
                "{message}"
            );
        }
    }

    #[test]
    fn invalid_names_and_ids_are_refused() {
        for bad in ["../etc", "..", ".", "a/b", "/abs", "", ".hidden", "a\nb"] {
            let body = json!({ "Name": bad, "Opts": {} }).to_string();
            let err = parse(CREATE, body.as_bytes()).unwrap_err();
            assert!(matches!(err, WireError::Name { .. }), "{bad:?}: {err:?}");
            assert_eq!(err.status(), 400);
            for path in [REMOVE, GET, PATH] {
                let body = json!({ "Name": bad }).to_string();
                assert!(parse(path, body.as_bytes()).is_err(), "{path} {bad:?}");
            }
            let body = json!({ "Name": "v1", "ID": bad }).to_string();
            assert!(parse(MOUNT, body.as_bytes()).is_err(), "ID {bad:?}");
            let body = json!({ "Name": bad, "ID": ID }).to_string();
            assert!(parse(UNMOUNT, body.as_bytes()).is_err(), "{bad:?}");
        }
        let err = parse(REMOVE, br#"{"Name":"../x"}"#).unwrap_err();
        assert_eq!(
            error_chain(&err),
            "invalid request to /VolumeDriver.Remove: volume name \"../x\" must start with a \
             letter or digit"
        );
    }

    #[test]
    fn unknown_endpoints_are_not_found() {
        for path in [
            "/",
            "",
            "/VolumeDriver.Nope",
            "/volumedriver.create",
            "/VolumeDriver.Create/",
            "VolumeDriver.Create",
            "/Plugin.Activate/x",
        ] {
            let err = parse(path, b"{}").unwrap_err();
            assert!(matches!(err, WireError::UnknownEndpoint { .. }), "{path}");
            assert_eq!(err.status(), 404);
        }
        let long = format!("/{}", "x".repeat(10_000));
        assert!(error_chain(&parse(&long, b"").unwrap_err()).len() < 200);
        assert!(error_chain(&WireError::method_not_allowed(&long)).len() < 100);
    }

    #[test]
    fn error_replies_are_json_with_the_whole_chain() {
        #[derive(Debug, Error)]
        #[error("outer failed")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("inner cause"));
        assert_eq!(error_chain(&err), "outer failed: inner cause");
        let reply = Reply::error(500, &err);
        assert_eq!(reply.status, 500);
        assert_eq!(reply.body, json!({ "Err": "outer failed: inner cause" }));
        assert_eq!(reply.error_message(), Some("outer failed: inner cause"));

        let statuses = [
            (
                WireError::MethodNotAllowed {
                    method: "GET".into(),
                },
                405,
            ),
            (WireError::BodyTooLarge { limit: 1 << 20 }, 413),
            (WireError::BodyTimeout, 408),
        ];
        for (err, status) in statuses {
            let reply = err.reply();
            assert_eq!(reply.status, status);
            assert!(reply.error_message().is_some());
        }
    }

    fn info() -> VolumeInfo {
        VolumeInfo {
            name: vol("v1"),
            mountpoint: None,
            created_at: UNIX_EPOCH + Duration::from_secs(1_714_564_800),
            base: Some(PathBuf::from("/srv/data")),
            volatile: Some(true),
            mounted: false,
            active_mounts: 0,
            upper: PathBuf::from("/var/lib/docker-on-top/v1/upper"),
            size: None,
            error: None,
        }
    }

    #[test]
    fn get_reply_shape() {
        assert_eq!(
            volume_json(&info()),
            json!({
                "Name": "v1",
                "CreatedAt": "2024-05-01T12:00:00Z",
                "Status": {
                    "Base": "/srv/data",
                    "Volatile": true,
                    "Mounted": false,
                    "ActiveMounts": 0,
                    "UpperDir": "/var/lib/docker-on-top/v1/upper",
                },
            })
        );
        let mounted = VolumeInfo {
            mountpoint: Some(PathBuf::from("/var/lib/docker-on-top/v1/merged")),
            mounted: true,
            active_mounts: 2,
            base: None,
            volatile: None,
            error: Some("cannot read the volume's metadata".into()),
            ..info()
        };
        assert_eq!(
            volume_json(&mounted),
            json!({
                "Name": "v1",
                "Mountpoint": "/var/lib/docker-on-top/v1/merged",
                "CreatedAt": "2024-05-01T12:00:00Z",
                "Status": {
                    "Mounted": true,
                    "ActiveMounts": 2,
                    "UpperDir": "/var/lib/docker-on-top/v1/upper",
                    "Error": "cannot read the volume's metadata",
                },
            })
        );
    }

    #[test]
    fn created_at_is_always_go_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_714_564_800) + Duration::from_millis(999)),
            "2024-05-01T12:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(400_000_000_000)),
            "9999-12-31T23:59:59Z"
        );
    }

    #[test]
    fn calls_display_for_logs() {
        let call = parse(MOUNT, format!(r#"{{"Name":"v1","ID":"{ID}"}}"#).as_bytes()).unwrap();
        assert_eq!(call.to_string(), format!("/VolumeDriver.Mount v1 id={ID}"));
        assert_eq!(Call::List.to_string(), "/VolumeDriver.List");
        assert_eq!(call.volume(), Some(&vol("v1")));
    }

    /// A driver over the recording test double: no privileges needed, nothing skipped.
    fn recording_driver(root: &std::path::Path) -> Driver<crate::sys::RecordingSys> {
        Driver::with_sys(&root.join("state"), crate::sys::RecordingSys::default()).unwrap()
    }

    #[test]
    fn activate_and_capabilities_replies() {
        let root = tempfile::tempdir().unwrap();
        let driver = recording_driver(root.path());
        assert_eq!(
            execute(&driver, Call::Activate, None),
            Reply::ok(json!({ "Implements": ["VolumeDriver"] }))
        );
        assert_eq!(
            execute(&driver, Call::Capabilities, None),
            Reply::ok(json!({ "Capabilities": { "Scope": "local" } }))
        );
    }

    /// Driver errors become replies: a missing volume is a 404 (dockerd's Get before every
    /// Create), anything else a 500; both `{"Err": ...}` with the whole chain of causes.
    #[test]
    fn driver_errors_map_to_statuses_and_messages() {
        let root = tempfile::tempdir().unwrap();
        let driver = recording_driver(root.path());
        let base = root.path().join("base");
        std::fs::create_dir(&base).unwrap();
        let create = |opts: serde_json::Value| {
            let call = parse(
                CREATE,
                json!({ "Name": "v1", "Opts": opts }).to_string().as_bytes(),
            );
            execute(&driver, call.unwrap(), None)
        };
        let missing = execute(&driver, Call::Get { name: vol("nope") }, None);
        assert_eq!(missing.status, 404);
        assert_eq!(missing.error_message(), Some("volume nope does not exist"));
        let bad = create(json!({ "base": base, "volatile": "maybe" }));
        assert_eq!(bad.status, 500);
        assert_eq!(
            bad.error_message(),
            Some(
                "invalid options for volume v1: volatile must be true, false, yes or no, not \"maybe\""
            )
        );
        assert_eq!(create(json!({ "base": base })), Reply::ok(json!({})));
        let conflict = create(json!({ "base": base, "volatile": "true" }));
        assert_eq!(conflict.status, 500);
        assert!(
            conflict
                .error_message()
                .unwrap()
                .contains("already exists with other options")
        );
        let unknown = execute(
            &driver,
            Call::Unmount {
                name: vol("v1"),
                id: MountId::parse(ID).unwrap(),
            },
            None,
        );
        assert_eq!(unknown.status, 500);
        assert!(
            unknown
                .error_message()
                .unwrap()
                .contains("has no mount with ID")
        );
        let mounted = execute(
            &driver,
            Call::Mount {
                name: vol("v1"),
                id: MountId::parse(ID).unwrap(),
            },
            None,
        );
        assert_eq!(mounted.status, 200);
        let list = execute(&driver, Call::List, None).encode();
        assert_eq!(list, br#"{"Volumes":[{"Name":"v1"}]}"#);
    }

    fn any_path() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(ENDPOINTS.to_vec()).prop_map(str::to_owned),
            "\\PC{0,40}",
        ]
    }

    fn any_body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            (
                "\\PC{0,20}",
                "\\PC{0,20}",
                proptest::option::of(proptest::collection::btree_map(
                    "\\PC{0,5}",
                    "\\PC{0,5}",
                    0..3
                ))
            )
                .prop_map(|(name, id, opts)| {
                    json!({ "Name": name, "ID": id, "Opts": opts })
                        .to_string()
                        .into_bytes()
                }),
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(path in any_path(), body in any_body()) {
            match parse(&path, &body) {
                Ok(call) => {
                    prop_assert_eq!(call.endpoint(), path.as_str());
                }
                Err(err) => {
                    let status = err.status();
                    prop_assert!(status == 400 || status == 404);
                    prop_assert!(!error_chain(&err).is_empty());
                }
            }
        }
    }
}
