use super::*;

fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn sizes_read_as_docker_volume_loopback_reads_them() {
    for (text, bytes) in [
        ("4096", 4096),
        ("100K", 100_000),
        ("100M", 100_000_000),
        ("1G", 1_000_000_000),
        ("2T", 2_000_000_000_000),
        ("100Ki", 102_400),
        ("100Mi", 100 << 20),
        ("100MiB", 100 << 20),
        ("1.5Gi", 3 << 29),
        ("1gi", 1 << 30),
    ] {
        assert_eq!(parse_size(text), Some(bytes), "{text}");
    }
    for text in [
        "",
        "0",
        "M",
        "1X",
        "1.5",
        "1..5G",
        ".5G",
        "-1G",
        "99999999999T",
        "1 Gi x",
    ] {
        assert_eq!(parse_size(text), None, "{text}");
    }
}

#[test]
fn volatile_values() {
    for (v, want) in [
        ("true", true),
        ("TRUE", true),
        ("Yes", true),
        ("no", false),
        ("False", false),
    ] {
        assert_eq!(parse_bool(v), Some(want), "{v}");
    }
    for v in ["1", "0", "", "on", "y"] {
        assert_eq!(parse_bool(v), None, "{v}");
    }
}

#[test]
fn base_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state");
    std::fs::create_dir(&root).unwrap();
    let root = std::fs::canonicalize(&root).unwrap();
    let data = tmp.path().join("da ta,x:y");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(tmp.path().join("file"), "x").unwrap();
    std::os::unix::fs::symlink(&data, tmp.path().join("link")).unwrap();

    let ok = VolumeOptions::parse(
        &opts(&[("base", tmp.path().join("link").to_str().unwrap())]),
        &root,
        &AllowedBases::anywhere(),
        &HostRoot::default(),
    )
    .unwrap();
    assert_eq!(ok.base.path(), std::fs::canonicalize(&data).unwrap());
    assert!(!ok.volatile);

    let err = |o: &[(&str, &str)]| {
        VolumeOptions::parse(
            &opts(o),
            &root,
            &AllowedBases::anywhere(),
            &HostRoot::default(),
        )
        .unwrap_err()
    };
    assert!(matches!(err(&[]), OptionsError::MissingBase));
    assert!(matches!(
        err(&[("base", "rel/dir")]),
        OptionsError::RelativeBase { .. }
    ));
    assert!(matches!(
        err(&[("base", "/nonexistent/dir")]),
        OptionsError::BaseUnusable { .. }
    ));
    let file = tmp.path().join("file");
    assert!(matches!(
        err(&[("base", file.to_str().unwrap())]),
        OptionsError::BaseNotDirectory { .. }
    ));
    for overlap in [root.clone(), root.join("x"), tmp.path().to_path_buf()] {
        std::fs::create_dir_all(&overlap).unwrap();
        assert!(matches!(
            err(&[("base", overlap.to_str().unwrap())]),
            OptionsError::BaseOverlapsRoot { .. }
        ));
    }
    let e = err(&[("base", "/"), ("color", "red")]);
    assert_eq!(
        e.to_string(),
        "unknown option \"color\"; valid options are: base, volatile, size, fs, sparse"
    );
    assert!(matches!(
        err(&[("base", "/tmp"), ("volatile", "maybe")]),
        OptionsError::BadVolatile { .. }
    ));
}

#[test]
fn allowed_bases_are_component_prefixes_of_canonical_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let t = std::fs::canonicalize(tmp.path()).unwrap();
    let root = t.join("state");
    for dir in [
        "state",
        "srv/data/sub",
        "srv/database",
        "srv/other",
        "elsewhere",
    ] {
        std::fs::create_dir_all(t.join(dir)).unwrap();
    }
    // A link inside the allowed tree that leads out of it, and one outside leading in.
    std::os::unix::fs::symlink(t.join("elsewhere"), t.join("srv/data/escape")).unwrap();
    std::os::unix::fs::symlink(t.join("srv/data/sub"), t.join("inward")).unwrap();
    // Allowed through a spelling with `..` and a trailing slash: canonicalised.
    let spelled = PathBuf::from(format!("{}/srv/other/../data/", t.display()));
    let allowed = AllowedBases::new(&[spelled, t.join("srv/data")], &HostRoot::default()).unwrap();
    assert_eq!(
        allowed.dirs(),
        [t.join("srv/data")],
        "deduplicated, canonical"
    );

    let parse = |base: &Path| {
        VolumeOptions::parse(
            &opts(&[("base", base.to_str().unwrap())]),
            &root,
            &allowed,
            &HostRoot::default(),
        )
    };
    for ok in [t.join("srv/data"), t.join("srv/data/sub"), t.join("inward")] {
        let parsed = parse(&ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        assert!(parsed.base.path().starts_with(t.join("srv/data")));
    }
    for refused in [
        t.join("srv/database"), // a string prefix, not a component prefix
        t.join("srv"),
        t.join("srv/other"),
        t.join("srv/data/escape"),
        t.join("srv/data/sub/../../other"),
    ] {
        let e = parse(&refused).unwrap_err();
        assert!(
            matches!(e, OptionsError::BaseNotAllowed { .. }),
            "{refused:?}: {e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("outside the directories this plugin allows")
                && text.contains(&format!("allows ({})", t.join("srv/data").display())),
            "{text}"
        );
    }
    // The other checks still come first: a missing base is not "not allowed".
    assert!(matches!(
        parse(&t.join("srv/data/missing")).unwrap_err(),
        OptionsError::BaseUnusable { .. }
    ));
    // No list: anywhere.
    assert!(
        AllowedBases::new(&[], &HostRoot::default())
            .unwrap()
            .permits(Path::new("/"))
    );
    assert!(AllowedBases::anywhere().permits(&t.join("elsewhere")));
}

#[test]
fn allowed_base_must_be_an_existing_absolute_directory() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("file"), "x").unwrap();
    assert!(matches!(
        AllowedBases::new(&[PathBuf::from("srv/data")], &HostRoot::default()),
        Err(AllowedBaseError::Relative { .. })
    ));
    assert!(matches!(
        AllowedBases::new(&[tmp.path().join("missing")], &HostRoot::default()),
        Err(AllowedBaseError::Unusable { .. })
    ));
    assert!(matches!(
        AllowedBases::new(&[tmp.path().join("file")], &HostRoot::default()),
        Err(AllowedBaseError::NotDirectory { .. })
    ));
}

/// A host's tree under a prefix, as a managed plugin sees it (`--host-root`), and a state
/// root outside it. Its symlinks only lead where they should when resolved inside it.
struct HostTree {
    _tmp: tempfile::TempDir,
    prefix: PathBuf,
    root: PathBuf,
    host: HostRoot,
}

fn host_tree() -> HostTree {
    let tmp = tempfile::tempdir().unwrap();
    let t = std::fs::canonicalize(tmp.path()).unwrap();
    let prefix = t.join("host");
    std::fs::create_dir_all(prefix.join("data/real")).unwrap();
    std::fs::write(prefix.join("data/real/marker"), "inside").unwrap();
    std::fs::write(prefix.join("data/file"), "x").unwrap();
    // Absolute: outside the prefix it names the real host's /data/real, which is not
    // this one (and on a test machine is not there at all).
    std::os::unix::fs::symlink("/data/real", prefix.join("data/link")).unwrap();
    std::os::unix::fs::symlink("real", prefix.join("data/rel")).unwrap();
    // Enough `..` to reach this process's / from the prefix, and then /usr.
    std::os::unix::fs::symlink("../../../../../../../../usr", prefix.join("data/up")).unwrap();
    let root = t.join("state");
    std::fs::create_dir(&root).unwrap();
    let host = HostRoot::at(&prefix).unwrap();
    HostTree {
        _tmp: tmp,
        prefix,
        root,
        host,
    }
}

impl HostTree {
    fn parse(&self, base: &str) -> Result<VolumeOptions, OptionsError> {
        self.parse_allowed(base, &AllowedBases::anywhere())
    }
    fn parse_allowed(
        &self,
        base: &str,
        allowed: &AllowedBases,
    ) -> Result<VolumeOptions, OptionsError> {
        VolumeOptions::parse(&opts(&[("base", base)]), &self.root, allowed, &self.host)
    }
}

#[test]
fn bases_are_host_paths_resolved_inside_the_host_root() {
    let h = host_tree();
    assert_eq!(h.host.prefix(), Some(h.prefix.as_path()));
    assert_eq!(
        h.host.local(Path::new("/data/real")),
        h.prefix.join("data/real")
    );
    for spelling in [
        "/data/real",
        "/data/link",
        "/data/rel",
        "/data/real/",
        "/data/./real",
        "/../../data/real",
    ] {
        let parsed = h
            .parse(spelling)
            .unwrap_or_else(|e| panic!("{spelling}: {e}"));
        // Stored as the host names it: the prefix is this process's business only.
        assert_eq!(parsed.base.path(), Path::new("/data/real"), "{spelling}");
    }
    assert!(matches!(
        h.parse("/data/file").unwrap_err(),
        OptionsError::BaseNotDirectory { .. }
    ));
    assert!(matches!(
        h.parse("/data/missing").unwrap_err(),
        OptionsError::BaseUnusable { .. }
    ));
    // This process's /etc and /usr exist; the host tree's do not, and `..` and a symlink
    // full of `..` stop at the prefix as at a /.
    assert!(Path::new("/etc").is_dir() && Path::new("/usr").is_dir());
    for escape in ["/../../etc", "/data/../../../etc", "/data/up"] {
        let e = h.parse(escape).unwrap_err();
        assert!(
            matches!(e, OptionsError::BaseUnusable { .. }),
            "{escape}: {e:?}"
        );
    }
    std::fs::create_dir(h.prefix.join("etc")).unwrap();
    std::fs::create_dir(h.prefix.join("usr")).unwrap();
    assert_eq!(
        h.parse("/../../etc").unwrap().base.path(),
        Path::new("/etc")
    );
    assert_eq!(h.parse("/data/up").unwrap().base.path(), Path::new("/usr"));
    // No prefix is added to a relative path, which would make it absolute.
    assert!(matches!(
        h.parse("data/real").unwrap_err(),
        OptionsError::RelativeBase { .. }
    ));
}

#[test]
fn allowed_bases_are_canonicalised_inside_the_host_root() {
    let h = host_tree();
    std::fs::create_dir(h.prefix.join("etc")).unwrap();
    let allowed = AllowedBases::new(&[PathBuf::from("/data/link")], &h.host).unwrap();
    assert_eq!(allowed.dirs(), [PathBuf::from("/data/real")]);
    for ok in ["/data/real", "/data/link", "/data/rel"] {
        let parsed = h
            .parse_allowed(ok, &allowed)
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(parsed.base.path(), Path::new("/data/real"));
    }
    let e = h.parse_allowed("/etc", &allowed).unwrap_err();
    assert!(matches!(e, OptionsError::BaseNotAllowed { .. }), "{e:?}");
    assert!(e.to_string().contains("allows (/data/real)"), "{e}");

    // Looked up in the host's tree, not this process's: /usr is here, not there.
    assert!(Path::new("/usr").is_dir());
    assert!(matches!(
        AllowedBases::new(&[PathBuf::from("/usr")], &h.host),
        Err(AllowedBaseError::Unusable { .. })
    ));
    assert!(matches!(
        AllowedBases::new(&[PathBuf::from("/data/up")], &h.host),
        Err(AllowedBaseError::Unusable { .. })
    ));
    assert!(matches!(
        AllowedBases::new(&[PathBuf::from("/data/file")], &h.host),
        Err(AllowedBaseError::Unusable { .. } | AllowedBaseError::NotDirectory { .. })
    ));
}

#[test]
fn an_opened_base_is_found_inside_the_host_root_and_named_as_the_host_names_it() {
    let h = host_tree();
    let anywhere = AllowedBases::anywhere();
    for strict in [false, true] {
        let opened = OpenedBase::open(Path::new("/data/real"), &anywhere, strict, &h.host)
            .unwrap_or_else(|e| panic!("strict {strict}: {e}"));
        assert_eq!(opened.real_path(), Path::new("/data/real"));
        assert_eq!(
            std::fs::read_to_string(opened.fd_path().join("marker")).unwrap(),
            "inside"
        );
    }
    // Followed when not strict, and the real path is where it led.
    let followed = OpenedBase::open(Path::new("/data/link"), &anywhere, false, &h.host).unwrap();
    assert_eq!(followed.real_path(), Path::new("/data/real"));
    for link in ["/data/link", "/data/rel"] {
        let e = OpenedBase::open(Path::new(link), &anywhere, true, &h.host).unwrap_err();
        assert!(
            matches!(e, OptionsError::BaseSymlinked { .. }),
            "{link}: {e:?}"
        );
    }
    assert!(matches!(
        OpenedBase::open(Path::new("/data/file"), &anywhere, true, &h.host).unwrap_err(),
        OptionsError::BaseNotDirectory { .. }
    ));
    assert!(matches!(
        OpenedBase::open(Path::new("/usr"), &anywhere, true, &h.host).unwrap_err(),
        OptionsError::BaseUnusable { .. }
    ));
    // The allowed list is of host paths too.
    std::fs::create_dir(h.prefix.join("etc")).unwrap();
    let allowed = AllowedBases::new(&[PathBuf::from("/data")], &h.host).unwrap();
    OpenedBase::open(Path::new("/data/real"), &allowed, true, &h.host).unwrap();
    assert!(matches!(
        OpenedBase::open(Path::new("/etc"), &allowed, true, &h.host).unwrap_err(),
        OptionsError::BaseNotAllowed { .. }
    ));
}

#[test]
fn a_host_root_at_slash_is_no_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let t = std::fs::canonicalize(tmp.path()).unwrap();
    std::os::unix::fs::symlink("/", t.join("slash")).unwrap();
    std::fs::create_dir(t.join("real")).unwrap();
    std::os::unix::fs::symlink(t.join("real"), t.join("link")).unwrap();
    std::fs::create_dir(t.join("state")).unwrap();
    let link = t.join("link");
    for spelling in [Path::new("/"), &t.join("slash")] {
        let host = HostRoot::at(spelling).unwrap();
        assert_eq!(host.prefix(), None, "{spelling:?}");
        assert_eq!(host.local(&link), link);
        assert_eq!(host.canonicalize(&link).unwrap(), t.join("real"));
        let parsed = VolumeOptions::parse(
            &opts(&[("base", link.to_str().unwrap())]),
            &t.join("state"),
            &AllowedBases::anywhere(),
            &host,
        )
        .unwrap();
        assert_eq!(parsed.base.path(), t.join("real"));
        let opened =
            OpenedBase::open(&t.join("real"), &AllowedBases::anywhere(), true, &host).unwrap();
        assert_eq!(opened.real_path(), t.join("real"));
        assert!(matches!(
            OpenedBase::open(&link, &AllowedBases::anywhere(), true, &host).unwrap_err(),
            OptionsError::BaseSymlinked { .. }
        ));
    }
    assert!(HostRoot::at(&t.join("missing")).is_err());
}
