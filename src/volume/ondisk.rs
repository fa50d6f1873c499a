//! What named volumes keep on disk, outside the data area: the registry entry
//! (`<state-dir>/volumes/NAME.json`, no key material) and header I/O on the backing store;
//! and the error type of named-volume operations.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::VolumeError;
use super::header::{self, HEADER_COPIES, HEADER_COPY_BYTES, Header};
use crate::crypto;
use crate::kms::KmsError;

/// A registry entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Volume name.
    pub name: String,
    /// Backing file or device.
    pub backing: PathBuf,
    /// Volume UUID, hex.
    pub uuid: String,
    /// Deleted (tombstone).
    pub deleted: bool,
    /// The grant that lets the serving principal use a customer-managed key: `(key ARN, grant id)`.
    #[serde(default)]
    pub grant: Option<(String, String)>,
}

/// What went wrong with a named volume.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No such volume.
    #[error("no volume named {0:?} (see `nbdcrypt volume list`)")]
    NoSuchVolume(String),
    /// The volume was deleted.
    #[error("volume {0:?} was deleted: its key was destroyed, its data can never be read again")]
    Deleted(String),
    /// A volume of that name exists.
    #[error("a volume named {0:?} already exists")]
    Exists(String),
    /// The name is not usable.
    #[error(
        "invalid volume name {0:?}: use letters, digits, '-', '_' and '.', up to 64 characters"
    )]
    BadName(String),
    /// The key service refused or failed.
    #[error("volume {volume}: {source}")]
    Kms {
        /// Volume.
        volume: String,
        /// The KMS error (names the key, operation and reason).
        source: KmsError,
    },
    /// Both header copies are unusable.
    #[error(
        "volume {volume}: both header copies are unusable ({first}; {second}); refusing to serve"
    )]
    Header {
        /// Volume.
        volume: String,
        /// Copy 0's problem.
        first: header::HeaderError,
        /// Copy 1's problem.
        second: header::HeaderError,
    },
    /// The unwrapped key does not match the key-check value.
    #[error(
        "volume {0}: the unwrapped key does not match the volume's key-check value; refusing to serve garbage"
    )]
    WrongKey(String),
    /// The crypto layer refused.
    #[error("volume {volume}: {source}")]
    Crypto {
        /// Volume.
        volume: String,
        /// Why.
        source: crypto::CryptoError,
    },
    /// The volume layer refused.
    #[error("volume {volume}: {source}")]
    Volume {
        /// Volume.
        volume: String,
        /// Why.
        source: VolumeError,
    },
    /// File system trouble.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something the request cannot do (e.g. export-key on a scratch volume).
    #[error("{0}")]
    Refused(String),
}

pub(super) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ManagerError {
    let path = path.to_owned();
    move |source| ManagerError::Io { what, path, source }
}

pub(super) fn check_name(name: &str) -> Result<(), ManagerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ManagerError::BadName(name.to_owned()))
    }
}

/// Whether the registry has a tombstone for `name` (cheap; for a running server to poll).
pub fn is_deleted(state_dir: &Path, name: &str) -> bool {
    std::fs::read_to_string(state_dir.join("volumes").join(format!("{name}.json")))
        .ok()
        .and_then(|t| serde_json::from_str::<Entry>(&t).ok())
        .is_some_and(|e| e.deleted)
}

/// Reads both header copies of a backing store.
pub fn read_header(path: &Path, name: &str) -> Result<header::Loaded, ManagerError> {
    let f = std::fs::File::open(path).map_err(io("cannot open the backing store", path))?;
    let mut slots = vec![0u8; HEADER_COPY_BYTES * HEADER_COPIES];
    let mut done = 0;
    while done < slots.len() {
        match f.read_at(&mut slots[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => return Err(io("cannot read the header of", path)(e)),
        }
    }
    let (a, b) = slots.split_at(HEADER_COPY_BYTES);
    header::choose([a, b]).map_err(|[first, second]| ManagerError::Header {
        volume: name.to_owned(),
        first,
        second,
    })
}

/// Writes one header copy into `slot` and syncs.
pub fn write_header(path: &Path, h: &Header, slot: usize) -> Result<(), ManagerError> {
    let bytes = h
        .encode()
        .map_err(|e| ManagerError::Refused(e.to_string()))?;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io("cannot open the backing store", path))?;
    f.write_all_at(&bytes, (slot * HEADER_COPY_BYTES) as u64)
        .and_then(|()| f.sync_data())
        .map_err(io("cannot write the header of", path))
}
