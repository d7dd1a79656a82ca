//! The options of `docker volume create -o KEY=VALUE`, validated into [`VolumeOptions`].
//!
//! `base` must name an existing directory by an absolute path; it is canonicalised (symlinks
//! resolved) so that two spellings of one directory are one volume configuration, and it may
//! not be, contain, or lie inside the daemon's state root (an overlay whose lower holds its own
//! upper is undefined, and a volume must never expose the daemon's state). This module reads
//! metadata of the base directory only; it must not create or change anything.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The option keys this driver understands, for error messages.
pub const VALID_OPTIONS: &str = "base, volatile";

/// Why a set of options was refused.
#[derive(Debug, Error)]
pub enum OptionsError {
    #[error("option \"base\" is required: the absolute path of the host directory to expose")]
    MissingBase,
    #[error("unknown option {key:?}; valid options are: {VALID_OPTIONS}")]
    Unknown { key: String },
    #[error("base {path:?} is not an absolute path")]
    RelativeBase { path: String },
    #[error("base {path:?} cannot be used")]
    BaseUnusable {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("base {path:?} is not a directory")]
    BaseNotDirectory { path: PathBuf },
    #[error("base {path:?} overlaps the state directory {root:?}")]
    BaseOverlapsRoot { path: PathBuf, root: PathBuf },
    #[error("volatile must be true, false, yes or no, not {value:?}")]
    BadVolatile { value: String },
}

/// A base directory: canonical, absolute, an existing directory outside the state root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseDir(PathBuf);

impl BaseDir {
    /// Validates `raw` against the (canonical) state root `root`.
    pub fn parse(raw: &str, root: &Path) -> Result<Self, OptionsError> {
        if !raw.starts_with('/') {
            return Err(OptionsError::RelativeBase {
                path: raw.to_owned(),
            });
        }
        let canonical =
            std::fs::canonicalize(raw).map_err(|source| OptionsError::BaseUnusable {
                path: raw.to_owned(),
                source,
            })?;
        if !canonical.is_dir() {
            return Err(OptionsError::BaseNotDirectory { path: canonical });
        }
        if canonical.starts_with(root) || root.starts_with(&canonical) {
            return Err(OptionsError::BaseOverlapsRoot {
                path: canonical,
                root: root.to_owned(),
            });
        }
        Ok(Self(canonical))
    }

    /// Wraps a path read back from our own metadata, which was validated when it was written.
    pub fn from_trusted(path: PathBuf) -> Self {
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// The validated options of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOptions {
    pub base: BaseDir,
    pub volatile: bool,
}

impl VolumeOptions {
    /// Validates the options of a Create request; `root` is the canonical state root.
    pub fn parse(raw: &BTreeMap<String, String>, root: &Path) -> Result<Self, OptionsError> {
        if let Some(key) = raw
            .keys()
            .find(|k| !matches!(k.as_str(), "base" | "volatile"))
        {
            return Err(OptionsError::Unknown {
                key: key.chars().take(64).collect(),
            });
        }
        let volatile = match raw.get("volatile") {
            None => false,
            Some(v) => parse_bool(v).ok_or_else(|| OptionsError::BadVolatile {
                value: v.chars().take(64).collect(),
            })?,
        };
        let base = raw.get("base").ok_or(OptionsError::MissingBase)?;
        Ok(Self {
            base: BaseDir::parse(base, root)?,
            volatile,
        })
    }
}

/// `true`/`false`/`yes`/`no` in any case.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" => Some(true),
        "false" | "no" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
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
        )
        .unwrap();
        assert_eq!(ok.base.path(), std::fs::canonicalize(&data).unwrap());
        assert!(!ok.volatile);

        let err = |o: &[(&str, &str)]| VolumeOptions::parse(&opts(o), &root).unwrap_err();
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
        let e = err(&[("base", "/"), ("size", "1G")]);
        assert_eq!(
            e.to_string(),
            "unknown option \"size\"; valid options are: base, volatile"
        );
        assert!(matches!(
            err(&[("base", "/tmp"), ("volatile", "maybe")]),
            OptionsError::BadVolatile { .. }
        ));
    }
}
