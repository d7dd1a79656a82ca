//! Validated identifiers that arrive from the socket: volume names and mount IDs.
//!
//! Every string a client sends is checked here, once, at the edge. A `VolumeName` or a
//! `MountId` can only be built from a string that is safe to use as a single path component
//! under the state root, so nothing downstream re-checks it. This module must not touch the
//! filesystem.

use std::fmt;

use thiserror::Error;

/// Longest name or ID accepted, in bytes: one path component on Linux.
pub const MAX_COMPONENT_LEN: usize = 255;

/// Why a volume name or mount ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long, the limit is {MAX_COMPONENT_LEN}")]
    TooLong { what: &'static str, len: usize },
    #[error("{what} {value:?} must start with a letter or digit")]
    BadStart { what: &'static str, value: String },
    #[error("{what} {value:?} may only contain letters, digits, '_', '.' and '-'")]
    BadChar { what: &'static str, value: String },
}

/// Checks `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 255 bytes. Such a string can never be `.`,
/// `..`, contain `/` or NUL, or start with the `.` that marks the daemon's own entries.
fn check_component(what: &'static str, value: &str) -> Result<(), NameError> {
    let bytes = value.as_bytes();
    let Some(first) = bytes.first() else {
        return Err(NameError::Empty { what });
    };
    if bytes.len() > MAX_COMPONENT_LEN {
        return Err(NameError::TooLong {
            what,
            len: bytes.len(),
        });
    }
    // Shown values are cut so that a hostile 1 MiB name does not become a 1 MiB log line.
    let shown = || value.chars().take(64).collect::<String>();
    if !first.is_ascii_alphanumeric() {
        return Err(NameError::BadStart {
            what,
            value: shown(),
        });
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(NameError::BadChar {
            what,
            value: shown(),
        });
    }
    Ok(())
}

macro_rules! component_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty(String);

        impl $ty {
            /// Validates `value`; see the module docs for the alphabet.
            pub fn parse(value: &str) -> Result<Self, NameError> {
                check_component($what, value)?;
                Ok(Self(value.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<std::path::Path> for $ty {
            fn as_ref(&self) -> &std::path::Path {
                std::path::Path::new(&self.0)
            }
        }
    };
}

component_type!(
    /// A volume name: the name of the volume's directory under the state root.
    VolumeName,
    "volume name"
);
component_type!(
    /// A mount ID as dockerd (a hex string) or Podman (the container ID) sends it: the name
    /// of one file under the volume's `activemounts/`.
    MountId,
    "mount ID"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_docker_style_names() {
        for ok in [
            "a",
            "vol1",
            "my-vol_2.data",
            "0",
            "A.b-c_d",
            &"x".repeat(255),
        ] {
            assert_eq!(VolumeName::parse(ok).unwrap().as_str(), ok);
        }
        let id = "3f1c1b6a9f0e4a2b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b";
        assert_eq!(MountId::parse(id).unwrap().to_string(), id);
    }

    #[test]
    fn refuses_traversal_and_odd_bytes() {
        for bad in [
            "", ".", "..", "../etc", "a/b", "/abs", ".hidden", "-x", "_x", "a b", "a\0b", "a\nb",
            "ä", "a:b", "a,b", "a\\b",
        ] {
            assert!(VolumeName::parse(bad).is_err(), "{bad:?} accepted");
            assert!(MountId::parse(bad).is_err(), "{bad:?} accepted as ID");
        }
        assert_eq!(
            VolumeName::parse(&"x".repeat(256)),
            Err(NameError::TooLong {
                what: "volume name",
                len: 256
            })
        );
    }

    #[test]
    fn messages_name_the_field_and_cut_long_values() {
        let err = VolumeName::parse(&format!("-{}", "y".repeat(200))).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("volume name \"-yyy"), "{text}");
        assert!(text.len() < 150, "{text}");
        assert_eq!(
            MountId::parse("").unwrap_err().to_string(),
            "mount ID is empty"
        );
    }

    proptest! {
        #[test]
        fn anything_accepted_is_one_plain_component(s in "\\PC{0,300}") {
            if let Ok(name) = VolumeName::parse(&s) {
                let p = std::path::Path::new(name.as_str());
                let mut comps = p.components();
                prop_assert!(matches!(comps.next(), Some(std::path::Component::Normal(_))));
                prop_assert!(comps.next().is_none());
                prop_assert!(!s.starts_with('.'));
                prop_assert!(s.len() <= 255);
            }
        }
    }
}
