//! Unit tests of the wire format: decoding requests, encoding replies, mapping errors.

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
        malformed(path, body);
    }
}

/// The message of `body`'s refusal as a malformed body (a 400) at `path`.
fn malformed(path: &str, body: &[u8]) -> String {
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
    message
}

/// A key named twice means nothing certain (parsers differ on which one counts): refused at
/// any depth, also when spelled with an escape; the same keys in different objects are fine.
#[test]
fn a_key_named_twice_is_refused() {
    let cases: &[(&str, &[u8], &str)] = &[
        (
            CREATE,
            br#"{"Name":"a","Name":"b","Opts":{"base":"/srv"}}"#,
            "Name",
        ),
        (
            CREATE,
            br#"{"Name":"a","Opts":{"base":"/srv","base":"/etc"}}"#,
            "base",
        ),
        (
            CREATE,
            br#"{"Name":"a","Opts":{"base":"/srv"},"Opts":{}}"#,
            "Opts",
        ),
        (MOUNT, br#"{"Name":"a","ID":"x1","ID":"x2"}"#, "ID"),
        (GET, br#"{"Na\u006de":"a","Name":"b"}"#, "Name"),
        (REMOVE, br#"{"Name":"a","Extra":[{"k":1,"k":2}]}"#, "k"),
    ];
    for (path, body, key) in cases {
        let message = malformed(path, body);
        assert!(
            message.contains(&format!("key \"{key}\" appears twice in one object")),
            "{message}"
        );
    }
    let body = br#"{"Name":"a","Opts":{"Name":"x","base":"/srv"},"Extra":[{"k":1},{"k":2}]}"#;
    assert!(parse(CREATE, body).is_ok());
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
/// Create), a request that cannot be right a 400, one the volume's state refuses a 409, a
/// failure of the host a 500; all `{"Err": ...}` with the whole chain of causes. (`driver_status`
/// has no catch-all: a new error must be given its status.)
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
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.error_message(),
        Some(
            "invalid options for volume v1: volatile must be true, false, yes or no, not \"maybe\""
        )
    );
    assert_eq!(create(json!({ "base": base })), Reply::ok(json!({})));
    let conflict = create(json!({ "base": base, "volatile": "true" }));
    assert_eq!(conflict.status, 409);
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
    assert_eq!(unknown.status, 409);
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

    // Refused by the volume's state: a Remove while a process uses files in the mount.
    let mountpoint = driver.root().volume(&vol("v1")).mountpoint();
    driver.sys().state.lock().unwrap().busy.insert(mountpoint);
    let busy = execute(&driver, Call::Remove { name: vol("v1") }, None);
    assert_eq!(busy.status, 409, "{busy:?}");
    assert!(
        busy.error_message().unwrap().contains("is busy"),
        "{busy:?}"
    );
    // The host's failure: the base is gone under a volume.
    let gone = root.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    let call = parse(
        CREATE,
        json!({ "Name": "v2", "Opts": { "base": gone } })
            .to_string()
            .as_bytes(),
    );
    assert_eq!(execute(&driver, call.unwrap(), None), Reply::ok(json!({})));
    std::fs::remove_dir(&gone).unwrap();
    let mount = Call::Mount {
        name: vol("v2"),
        id: MountId::parse(ID).unwrap(),
    };
    let failed = execute(&driver, mount, None);
    assert_eq!(failed.status, 500, "{failed:?}");
    assert!(
        failed.error_message().unwrap().contains("is unusable"),
        "{failed:?}"
    );
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
