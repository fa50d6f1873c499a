//! What named volumes keep on disk, outside the data area: the registry entry
//! (`<state-dir>/volumes/NAME.json`, no key material) and header I/O on the backing store;
//! and the error type of named-volume operations.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::VolumeError;
use super::header::{self, HEADER_COPIES, HEADER_COPY_BYTES, Header, Lease};
use crate::crypto;
use crate::kms::KmsError;
use crate::storage::{Storage, StoreLock};

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
    /// Set while `volume create` has not finished: what it was asked to do, so that
    /// `--resume` can finish it and `volume delete` can undo it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

/// An unfinished `volume create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Size in bytes.
    pub size: u64,
    /// Scratch or persistent.
    pub volume_type: header::VolumeType,
    /// The KMS key asked for.
    pub kms_key: Option<String>,
    /// Sector size in bytes.
    pub sector_size: u16,
    /// Discards on.
    pub discards: bool,
    /// Preallocation asked for.
    pub preallocate: bool,
    /// The backing file did not exist before: undoing the creation removes it.
    pub created_backing: bool,
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
    /// The backing store failed (path unknown at this layer; see [`ManagerError::at`]).
    #[error("volume {volume}: {what}: {source}")]
    Store {
        /// Volume.
        volume: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Another process serves the volume (or administers it right now).
    #[error("volume {volume} is {}{hint}", match holder {
        Some(l) => format!("being served by {l}"),
        None => "in use by another nbdcrypt process (a server starting, or a volume command)".to_owned(),
    })]
    Busy {
        /// Volume.
        volume: String,
        /// Who holds it, as its lease says.
        holder: Option<Lease>,
        /// The way out.
        hint: String,
    },
    /// Creation never finished.
    #[error(
        "volume {volume} is incomplete: its creation was interrupted{}; finish it with `nbdcrypt volume create {volume} --resume`, or remove it with `nbdcrypt volume delete {volume}`",
        if *done > 0 { format!(" after {} of {} were preallocated", crate::human::iec_bytes(*done), crate::human::iec_bytes(*size)) } else { String::new() }
    )]
    Incomplete {
        /// Volume.
        volume: String,
        /// Bytes preallocated so far.
        done: u64,
        /// Volume size.
        size: u64,
    },
    /// A `volume reencrypt` has not finished: the volume is under two keys.
    #[error(
        "volume {volume} is being re-encrypted: {} of {} are under the new key; finish with `nbdcrypt volume reencrypt {volume}` (it resumes there) before serving it",
        crate::human::iec_bytes(*done), crate::human::iec_bytes(*size)
    )]
    Reencrypting {
        /// Volume.
        volume: String,
        /// Bytes re-encrypted so far.
        done: u64,
        /// Volume size.
        size: u64,
    },
    /// The backing store is shorter than the header says the volume is.
    #[error(
        "volume {volume}: backing store {path} is {}, volume needs {} ({} of data + the 1 MiB header area); it was truncated or replaced: restore it from a copy, or `nbdcrypt volume delete {volume}`",
        crate::human::iec_bytes(*actual), crate::human::iec_bytes(*needed), crate::human::iec_bytes(needed.saturating_sub(header::DATA_OFFSET))
    )]
    Short {
        /// Volume.
        volume: String,
        /// Backing path.
        path: PathBuf,
        /// Its length.
        actual: u64,
        /// What the header needs.
        needed: u64,
    },
    /// A header that cannot be encoded (a field too long for its slot).
    #[error("volume {volume}: cannot encode its header: {source}")]
    Encode {
        /// Volume.
        volume: String,
        /// Why.
        source: header::HeaderError,
    },
    /// The system's random-number generator failed.
    #[error("cannot draw random bytes for {what}: {source}")]
    Entropy {
        /// What they were for.
        what: &'static str,
        /// Why.
        source: getrandom::Error,
    },
    /// Something the request cannot do (e.g. export-key on a scratch volume).
    #[error("{0}")]
    Refused(String),
}

impl ManagerError {
    /// Names the backing path in a store error.
    pub fn at(self, path: &Path) -> ManagerError {
        match self {
            ManagerError::Store { what, source, .. } => ManagerError::Io {
                what,
                path: path.to_owned(),
                source,
            },
            other => other,
        }
    }
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
    std::fs::read_to_string(crate::fsutil::StateLayout::new(state_dir).entry(name))
        .ok()
        .and_then(|t| serde_json::from_str::<Entry>(&t).ok())
        .is_some_and(|e| e.deleted)
}

/// Reads both header copies of the backing store at `path` (a path or an upstream URI, opened
/// read-only).
pub fn read_header(path: &Path, name: &str) -> Result<header::Loaded, ManagerError> {
    let store = super::backing::open(path, true, &super::backing::DEFAULT_UPSTREAM)
        .map_err(io("cannot open the backing store", path))?;
    read_header_from(store.as_ref(), name).map_err(|e| e.at(path))
}

/// Reads both header copies from `store`.
pub fn read_header_from(store: &dyn Storage, name: &str) -> Result<header::Loaded, ManagerError> {
    let mut slots = vec![0u8; HEADER_COPY_BYTES * HEADER_COPIES];
    store
        .read_at(&mut slots, 0)
        .map_err(store_io(name, "cannot read the header"))?;
    let (a, b) = slots.split_at(HEADER_COPY_BYTES);
    header::choose([a, b]).map_err(|[first, second]| ManagerError::Header {
        volume: name.to_owned(),
        first,
        second,
    })
}

/// Writes one header copy into `slot`; durable when it returns.
pub fn write_slot(
    store: &dyn Storage,
    name: &str,
    h: &Header,
    slot: usize,
) -> Result<(), ManagerError> {
    let bytes = h.encode().map_err(|source| ManagerError::Encode {
        volume: name.to_owned(),
        source,
    })?;
    store
        .write_durable_at(&bytes, (slot * HEADER_COPY_BYTES) as u64)
        .map_err(store_io(name, "cannot write the header"))
}

/// How many header copies an update rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copies {
    /// Only the older copy (lease renewals): the newer one stays intact until the next update.
    Older,
    /// The older copy, then the newer one: no copy of the previous contents survives (key
    /// destruction, rewrap).
    Both,
}

/// Read-modify-write of the header under the store's header lock: reads the newest valid copy,
/// lets `change` edit it (`Ok(false)`: nothing to write), then writes the older slot with the
/// next sequence number, and with [`Copies::Both`] the other slot after it. A crash at any
/// point leaves one valid copy, old or new. Returns the header as it now stands.
pub fn update_header(
    store: &dyn Storage,
    name: &str,
    copies: Copies,
    change: impl FnOnce(&mut Header) -> Result<bool, ManagerError>,
) -> Result<Header, ManagerError> {
    store
        .lock(StoreLock::Header, true)
        .map_err(store_io(name, "cannot lock the header"))?;
    let result = (|| {
        let loaded = read_header_from(store, name)?;
        let mut h = loaded.header;
        if !change(&mut h)? {
            return Ok(h);
        }
        let first = header::next_slot(loaded.slot);
        h.sequence += 1;
        write_slot(store, name, &h, first)?;
        if copies == Copies::Both {
            h.sequence += 1;
            write_slot(store, name, &h, loaded.slot)?;
        }
        Ok(h)
    })();
    let unlocked = store
        .unlock(StoreLock::Header)
        .map_err(store_io(name, "cannot unlock the header"));
    let h = result?;
    unlocked?;
    Ok(h)
}

fn store_io(name: &str, what: &'static str) -> impl FnOnce(std::io::Error) -> ManagerError {
    let volume = name.to_owned();
    move |source| ManagerError::Store {
        volume,
        what,
        source,
    }
}
