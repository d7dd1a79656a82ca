//! The volume driver: volume lifecycle, per-ID mount counts and the volatile discard.
//! (API skeleton; bodies being written.)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use thiserror::Error;

use crate::names::{MountId, VolumeName};
use crate::options::OptionsError;

/// Everything a request can fail with. Messages are one lower-case sentence; causes are
/// chained as `source`, never repeated in the message.
#[derive(Debug, Error)]
pub enum DriverError {
    #[error("volume {0} does not exist")]
    NoSuchVolume(VolumeName),
    #[error("invalid options for volume {name}")]
    Options {
        name: VolumeName,
        #[source]
        source: OptionsError,
    },
    #[error("todo")]
    Todo,
}

/// What `Get` reports about a volume.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub name: VolumeName,
    /// Set only while the overlay is mounted.
    pub mountpoint: Option<PathBuf>,
    pub created_at: SystemTime,
    pub base: Option<PathBuf>,
    pub volatile: Option<bool>,
    pub mounted: bool,
    /// Sum of the usage counts of all mount IDs on record.
    pub active_mounts: u64,
    pub upper: PathBuf,
    /// Set when the volume's directory exists but its metadata cannot be read: the volume is
    /// still reported (dockerd forgets a volume on any `Get` error).
    pub error: Option<String>,
}

pub struct Driver {}

impl Driver {
    pub fn create(
        &self,
        _name: &VolumeName,
        _options: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        Err(DriverError::Todo)
    }
    pub fn remove(&self, _name: &VolumeName) -> Result<(), DriverError> {
        Err(DriverError::Todo)
    }
    pub fn mount(&self, _name: &VolumeName, _id: &MountId) -> Result<PathBuf, DriverError> {
        Err(DriverError::Todo)
    }
    pub fn unmount(&self, _name: &VolumeName, _id: &MountId) -> Result<(), DriverError> {
        Err(DriverError::Todo)
    }
    /// The mountpoint while mounted, `None` while not; an error for an unknown volume.
    pub fn path(&self, _name: &VolumeName) -> Result<Option<PathBuf>, DriverError> {
        Err(DriverError::Todo)
    }
    pub fn get(&self, _name: &VolumeName) -> Result<VolumeInfo, DriverError> {
        Err(DriverError::Todo)
    }
    pub fn list(&self) -> Result<Vec<VolumeName>, DriverError> {
        Err(DriverError::Todo)
    }
}

/// How the driver is set up; built by `main` from the command line.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The state root, `/var/lib/docker-on-top` by default. Created if missing.
    pub root: PathBuf,
    /// Use legacy `mount(2)` with escaped options even where the new mount API works.
    pub legacy_mount_api: bool,
}

impl Driver {
    /// Opens (creating if needed) the state root. Does no work proportional to the number of
    /// volumes: the service may be socket-activated for every request.
    pub fn open(_config: DriverConfig) -> Result<Driver, DriverError> {
        Ok(Driver {})
    }

    /// Starts the background thread that deletes discarded uppers and removed volumes,
    /// finishing deletions a previous process was interrupted in. Call once, after the
    /// service has told systemd it is ready.
    pub fn start_janitor(&self) {}
}
