//! Reading `/proc/PID/mountinfo`: where a volume's overlay is mounted, and which copies of it
//! in another mount namespace our own unmount takes away.
//!
//! Parsing and the propagation rule only: it reads no file and decides nothing about volumes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::escape_option_path;

/// One line of a mountinfo text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub id: u64,
    pub parent: u64,
    /// Its file system's device, `(major, minor)`, as its directories' `st_dev` shows it.
    pub dev: (u32, u32),
    /// The directory of its file system mounted here (not `/` for a bind of a subdirectory).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Its shared peer group (`shared:N`), if it has one.
    pub shared: Option<u64>,
    /// The peer group it receives mounts from (`master:N`), if it is a slave.
    pub master: Option<u64>,
    /// An overlay's `upperdir=` option (unescaped), as the mounter gave it.
    pub upper: Option<Vec<u8>>,
}

impl Mount {
    /// Whether it is an overlay whose upper is `upper`.
    pub fn shows_upper(&self, upper: &Path) -> bool {
        self.upper
            .as_deref()
            .is_some_and(|shown| is_upper(shown, upper))
    }
}

/// Whether an overlay's `upperdir=` as the kernel shows it (the string it was given) names
/// `upper`: plain (the new mount API) or escaped (mount(2)), compared component by component,
/// because the Go version gave `ROOT/NAME/upper/` with a trailing slash.
fn is_upper(shown: &[u8], upper: &Path) -> bool {
    let shown = Path::new(OsStr::from_bytes(shown));
    shown == upper || shown == Path::new(OsStr::from_bytes(&escape_option_path(upper.as_os_str())))
}

/// Whether an overlay's `upperdir=`, as [`is_upper`] reads it, lies in the directory `dir`.
pub fn upper_is_in(shown: &Path, dir: &Path) -> bool {
    let escaped = escape_option_path(dir.as_os_str());
    shown.starts_with(dir) || shown.starts_with(OsStr::from_bytes(&escaped))
}

/// The mounts a mountinfo text lists ("ID PARENT DEV ROOT MOUNTPOINT OPTIONS [OPTIONAL...] -
/// FSTYPE SOURCE SUPER_OPTIONS"); lines that do not parse are left out.
pub fn parse(info: &[u8]) -> Vec<Mount> {
    let mut found = Vec::new();
    for line in info.split(|&b| b == b'\n') {
        let Some(pos) = line.windows(3).position(|w| w == b" - ") else {
            continue;
        };
        let mut fields = line[..pos].split(|&b| b == b' ');
        let mut number =
            || -> Option<u64> { std::str::from_utf8(fields.next()?).ok()?.parse().ok() };
        let (Some(id), Some(parent)) = (number(), number()) else {
            continue;
        };
        let path = |field: &[u8]| PathBuf::from(OsStr::from_bytes(&unescape(field)));
        let (Some(dev), Some(root), Some(mount_point), Some(_options)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let dev = std::str::from_utf8(dev).ok().and_then(|dev| {
            let (major, minor) = dev.split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        });
        let Some(dev) = dev else { continue };
        let tagged = |optional: &[u8], tag: &[u8]| -> Option<u64> {
            std::str::from_utf8(optional.strip_prefix(tag)?)
                .ok()?
                .parse()
                .ok()
        };
        let (mut shared, mut master) = (None, None);
        for optional in fields {
            shared = shared.or(tagged(optional, b"shared:"));
            master = master.or(tagged(optional, b"master:"));
        }
        let upper = overlay_upper(&line[pos + 3..]);
        found.push(Mount {
            id,
            parent,
            dev,
            root: path(root),
            mount_point: path(mount_point),
            shared,
            master,
            upper,
        });
    }
    found
}

/// The mounts of the file system whose device is `dev`.
pub fn mounts_of_device(mounts: &[Mount], dev: (u32, u32)) -> impl Iterator<Item = &Mount> {
    mounts.iter().filter(move |m| m.dev == dev)
}

/// Whether some mount of the file system `dev` is what a path lookup finds at its mount
/// point: a copy with nothing mounted on top of it or on a directory above it in its parent
/// (a managed plugin's overlay, as dockerd's namespace has it, is where dockerd binds it from).
pub fn shows_device(mounts: &[Mount], dev: (u32, u32)) -> bool {
    mounts_of_device(mounts, dev)
        .any(|copy| lookup(mounts, &copy.mount_point).is_some_and(|found| found.dev == dev))
}

/// The mount a path lookup of the absolute `path` ends on: from the namespace's root, into the
/// mount on the first directory of the path that has one, and so on (a mount on a mount point
/// is a child of the one it covers).
pub fn lookup<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    let mut at = (mounts.iter()).find(|m| !mounts.iter().any(|p| p.id == m.parent))?;
    // A mount table is a tree; the bound guards against one that is not.
    for _ in 0..mounts.len() {
        let next = (mounts.iter())
            .filter(|m| m.parent == at.id && m.id != at.id && path.starts_with(&m.mount_point))
            .min_by_key(|m| m.mount_point.components().count());
        match next {
            Some(next) => at = next,
            None => break,
        }
    }
    Some(at)
}

/// Whether a mountinfo text lists an overlay with `upperdir` equal to `upper`. Cheaper than
/// a full parse: it looks only at the file system type and the options of each line (most mount
/// namespaces a look reads hold no copy).
pub fn mountinfo_has_overlay_upper(info: &[u8], upper: &Path) -> bool {
    info.split(|&b| b == b'\n').any(|line| {
        line.windows(3)
            .position(|w| w == b" - ")
            .and_then(|pos| overlay_upper(&line[pos + 3..]))
            .is_some_and(|shown| is_upper(&shown, upper))
    })
}

/// The `upperdir=` (unescaped) of a line's part after " - " ("FSTYPE SOURCE SUPER_OPTIONS"),
/// if it is an overlay's.
fn overlay_upper(fs_part: &[u8]) -> Option<Vec<u8>> {
    let mut fields = fs_part.split(|&b| b == b' ');
    let (Some(b"overlay"), Some(_source), Some(options)) =
        (fields.next(), fields.next(), fields.next())
    else {
        return None;
    };
    (options.split(|&b| b == b','))
        .find_map(|opt| opt.strip_prefix(b"upperdir="))
        .map(unescape)
}

/// Where an unmount of one of our mounts of an overlay reaches. The kernel propagates an
/// unmount from the mount it sits on to that mount's peers and slaves: a copy goes with ours
/// when it sits, with no mount of its own on top, on a peer or slave of our mount's parent, at
/// the same place in that file system. Anything else (a private copy, a bind made elsewhere,
/// a copy with mounts on it) lives on after our unmount, and holds the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    /// Our mount's peer group: the copies propagated from it are its peers or slaves.
    group: u64,
    /// The peer group of the mount it sits on.
    parent_group: u64,
    /// Where it sits in that mount's file system.
    place: PathBuf,
}

impl Reach {
    /// The reach of each of our mounts (`own`: our mountinfo) of the overlay on `upper`; none
    /// for a mount that is not shared, or not on a shared mount (a private mount has no
    /// copies that go with it).
    pub fn of(own: &[Mount], upper: &Path) -> Vec<Reach> {
        (own.iter())
            .filter(|m| m.shows_upper(upper))
            .filter_map(|m| {
                let parent = own.iter().find(|p| p.id == m.parent)?;
                Some(Reach {
                    group: m.shared?,
                    parent_group: parent.shared?,
                    place: place_in(parent, m)?,
                })
            })
            .collect()
    }
}

/// Whether the mounts of one mount namespace (`mounts`) hold the overlay on `upper`: some copy
/// lives on after our unmount, which reaches as far as `reach`.
pub fn holds(mounts: &[Mount], upper: &Path, reach: &[Reach]) -> bool {
    if reach.is_empty() {
        return mounts.iter().any(|m| m.shows_upper(upper));
    }
    let goes_with_ours = |copy: &Mount| {
        let on_top = mounts.iter().any(|m| m.parent == copy.id);
        let Some(parent) = mounts.iter().find(|p| p.id == copy.parent) else {
            return false;
        };
        !on_top
            && reach.iter().any(|r| {
                let of_group = |m: &Mount| m.shared == Some(r.group) || m.master == Some(r.group);
                let of_parent_group =
                    parent.shared == Some(r.parent_group) || parent.master == Some(r.parent_group);
                of_group(copy)
                    && of_parent_group
                    && place_in(parent, copy).as_ref() == Some(&r.place)
            })
    };
    (mounts.iter())
        .filter(|m| m.shows_upper(upper))
        .any(|copy| !goes_with_ours(copy))
}

/// Where `child` sits in `parent`'s file system: the parent's root joined with the child's
/// mount point below the parent's.
fn place_in(parent: &Mount, child: &Mount) -> Option<PathBuf> {
    let below = child.mount_point.strip_prefix(&parent.mount_point).ok()?;
    Some(parent.root.join(below))
}

/// Undoes the octal escapes (`\040` and the like) of `/proc/*/mountinfo`.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && i + 3 < field.len()
            && field[i + 1..i + 4]
                .iter()
                .all(|c| (b'0'..=b'7').contains(c))
        {
            let v = field[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ours: a shared tmpfs (group 1) at /p, the overlay (group 2) on it at /p/v.
    const OURS: &[u8] = b"20 1 8:1 / / rw - ext4 /dev/root rw\n\
        30 20 0:40 / /p rw shared:1 - tmpfs t rw\n\
        31 30 0:41 / /p/v rw shared:2 - overlay o rw,upperdir=/u,workdir=/w\n";

    #[test]
    fn a_file_systems_mounts_are_found_by_its_device() {
        let mounts = parse(OURS);
        assert_eq!(mounts[2].dev, (0, 41));
        let of = |dev| -> Vec<&Path> {
            mounts_of_device(&mounts, dev)
                .map(|m| m.mount_point.as_path())
                .collect()
        };
        assert_eq!(of((0, 41)), [Path::new("/p/v")]);
        assert_eq!(mounts[2].upper.as_deref(), Some(&b"/u"[..]));
        assert_eq!(of((0, 40)), [Path::new("/p")]);
        assert!(of((0, 99)).is_empty());
        assert!(parse(b"20 1 x / / rw - ext4 /dev/root rw\n").is_empty());
    }

    /// dockerd's namespace: its shared data root (group 2) at /d, the plugin's propagated
    /// mount bound on /d/p (a peer), and the overlay (0:50) propagated to both.
    const DOCKERD: &str = "1 0 8:1 / / rw - ext4 /dev/root rw\n\
        50 1 8:1 /d /d rw shared:2 - ext4 /dev/root rw\n\
        51 50 8:1 /d/p /d/p rw shared:2 - ext4 /dev/root rw\n\
        90 50 0:50 / /d/p/v rw shared:6 - overlay o rw,upperdir=/u,workdir=/w\n\
        91 51 0:50 / /d/p/v rw shared:6 - overlay o rw,upperdir=/u,workdir=/w\n";

    #[test]
    fn a_device_shows_where_a_lookup_of_its_mount_point_ends() {
        let shows = |info: &str| {
            let parsed = shows_device(&parse(info.as_bytes()), (0, 50));
            // Mounts elsewhere change nothing.
            let more = format!(
                "{info}70 1 0:70 / /d/px rw - tmpfs t rw\n71 50 0:71 / /d/q rw - tmpfs t rw\n"
            );
            assert_eq!(
                shows_device(&parse(more.as_bytes()), (0, 50)),
                parsed,
                "{more}"
            );
            parsed
        };
        assert!(shows(DOCKERD));
        // The propagated mount taken away: the copy on the data root is found.
        assert!(shows(
            &DOCKERD
                .replace("51 50 8:1 /d/p /d/p rw shared:2 - ext4 /dev/root rw\n", "")
                .replace(
                    "91 51 0:50 / /d/p/v rw shared:6 - overlay o rw,upperdir=/u,workdir=/w\n",
                    ""
                )
        ));
        // The propagated mount no longer a peer: its plain directory covers the copy below.
        assert!(!shows(&DOCKERD.replace(
            "91 51 0:50 / /d/p/v rw shared:6 - overlay o rw,upperdir=/u,workdir=/w\n",
            ""
        )));
        // Something mounted on top of the copies.
        assert!(!shows(&format!(
            "{DOCKERD}95 91 0:60 / /d/p/v rw - tmpfs t rw\n"
        )));
        // Something mounted on a directory above them, later.
        assert!(!shows(&format!(
            "{DOCKERD}96 51 0:61 / /d/p rw - tmpfs t rw\n"
        )));
        // No copy at all.
        assert!(!shows("1 0 8:1 / / rw - ext4 /dev/root rw\n"));
    }

    #[test]
    fn a_lookup_ends_on_the_mount_a_path_is_in() {
        let mounts = parse(DOCKERD.as_bytes());
        let at = |path: &str| lookup(&mounts, Path::new(path)).map(|m| m.id);
        assert_eq!(at("/etc"), Some(1));
        assert_eq!(at("/d/x"), Some(50));
        assert_eq!(at("/d/p"), Some(51));
        assert_eq!(at("/d/p/v/deeper"), Some(91));
    }

    #[test]
    fn an_upper_lies_in_a_directory_plain_or_escaped() {
        let dir = Path::new("/r,o:t");
        assert!(upper_is_in(Path::new("/r,o:t/v/upper"), dir));
        assert!(
            upper_is_in(Path::new("/r\\,o\\:t/v/upper"), dir),
            "mount(2)'s form"
        );
        assert!(!upper_is_in(Path::new("/r,o:t2/v/upper"), dir));
        assert!(!upper_is_in(Path::new("/elsewhere/upper"), dir));
    }

    fn holds_in(theirs: &[u8]) -> bool {
        let reach = Reach::of(&parse(OURS), Path::new("/u"));
        assert_eq!(reach.len(), 1);
        holds(&parse(theirs), Path::new("/u"), &reach)
    }

    #[test]
    fn copies_that_go_with_our_unmount_hold_nothing() {
        // A peer of our tmpfs seen elsewhere (dockerd's propagated mount), a bind of a
        // subdirectory holding it, and a slave.
        assert!(!holds_in(
            b"40 1 0:40 / /data/plugins/x/propagated-mount rw shared:1 - tmpfs t rw\n\
              41 40 0:41 / /data/plugins/x/propagated-mount/v rw shared:2 - overlay o rw,upperdir=/u\n"
        ));
        assert!(!holds_in(
            b"40 1 0:40 / /q rw master:1 - tmpfs t rw\n\
              41 40 0:41 / /q/v rw master:2 - overlay o rw,upperdir=/u\n"
        ));
        assert!(!holds_in(b"40 1 0:40 / /q rw shared:1 - tmpfs t rw\n"));
    }

    #[test]
    fn copies_that_live_on_hold_the_overlay() {
        // Private; a bind elsewhere in a peer; on a tmpfs of another group; at another
        // place; with a mount on top.
        for theirs in [
            &b"40 1 0:40 / /q rw - tmpfs t rw\n41 40 0:41 / /q/v rw - overlay o rw,upperdir=/u\n"[..],
            b"40 1 0:40 / /q rw shared:1 - tmpfs t rw\n\
              41 40 0:41 / /q/v rw shared:2 - overlay o rw,upperdir=/u\n\
              42 1 0:41 / /elsewhere rw shared:2 - overlay o rw,upperdir=/u\n",
            b"40 1 0:40 / /q rw shared:9 - tmpfs t rw\n41 40 0:41 / /q/v rw shared:2 - overlay o rw,upperdir=/u\n",
            b"40 1 0:40 / /q rw shared:1 - tmpfs t rw\n41 40 0:41 / /q/w rw shared:2 - overlay o rw,upperdir=/u\n",
            b"40 1 0:40 / /q rw shared:1 - tmpfs t rw\n\
              41 40 0:41 / /q/v rw shared:2 - overlay o rw,upperdir=/u\n\
              42 41 0:42 / /q/v/sub rw - tmpfs t rw\n",
        ] {
            assert!(holds_in(theirs), "{}", String::from_utf8_lossy(theirs));
        }
    }

    #[test]
    fn a_private_mount_of_ours_reaches_no_copy() {
        let ours =
            b"30 1 0:40 / /p rw - tmpfs t rw\n31 30 0:41 / /p/v rw - overlay o rw,upperdir=/u\n";
        assert!(Reach::of(&parse(ours), Path::new("/u")).is_empty());
    }

    #[test]
    fn finds_overlays_by_their_upper() {
        let info = b"22 1 8:1 / / rw shared:1 - ext4 /dev/root rw\n\
            99 22 0:77 / /m rw shared:41 - overlay dot rw,upperdir=/u,workdir=/w\n\
            97 22 0:78 / /o rw - overlay dot rw,upperdir=/v,workdir=/w\n";
        assert!(mountinfo_has_overlay_upper(info, Path::new("/u")));
        assert!(!mountinfo_has_overlay_upper(info, Path::new("/w")));
        let mounts = parse(info);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[0].upper, None);
        assert!(mounts[1].shows_upper(Path::new("/u")) && mounts[1].shared == Some(41));
    }

    #[test]
    fn parses_escaped_fields_and_tags() {
        let m = &parse(b"7 3 0:1 /sub\\040dir /m\\040p rw shared:4 master:2 - overlay o rw,upperdir=/a\\054b\n")[0];
        assert_eq!(
            (m.id, m.parent, m.shared, m.master),
            (7, 3, Some(4), Some(2))
        );
        assert_eq!(m.root, Path::new("/sub dir"));
        assert_eq!(m.mount_point, Path::new("/m p"));
        assert!(m.shows_upper(Path::new("/a,b")));
    }

    #[test]
    fn an_upper_given_with_a_trailing_slash_is_the_same_upper() {
        // As the Go version mounts: `upperdir=/var/lib/docker-on-top/NAME/upper/`.
        let info =
            b"99 22 0:77 / /m rw - overlay o rw,upperdir=/r/v/upper/,workdir=/r/v/workdir/\n\
            98 22 0:78 / /n rw - overlay o rw,upperdir=/r//a\\054b/upper/,workdir=/w\n";
        assert!(mountinfo_has_overlay_upper(info, Path::new("/r/v/upper")));
        assert!(parse(info)[0].shows_upper(Path::new("/r/v/upper")));
        assert!(mountinfo_has_overlay_upper(info, Path::new("/r/a,b/upper")));
        assert!(!mountinfo_has_overlay_upper(info, Path::new("/r/v/upp")));
        assert!(!mountinfo_has_overlay_upper(info, Path::new("/r/v")));
    }
}
