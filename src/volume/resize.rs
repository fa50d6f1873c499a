//! `volume resize`: grows a volume, served or not.
//!
//! The store is made long enough first (a regular file is extended, sparse: the new sectors
//! are holes and read as zeroes; a block device or an upstream export must have been grown by
//! its owner), then the size is written into both header copies under the header lock, one
//! after the other with rising sequence numbers. A crash between the two steps leaves a store
//! longer than the volume, which is allowed. A server of the volume sees the new size at its
//! next header check (every 250 ms) and tells it to new connections; a connection keeps the
//! size it negotiated (NBD has no size-change notice). Shrinking is refused: it would cut off
//! the end of a file system.

use super::header::{DATA_OFFSET, Header};
use super::manager::Manager;
use super::ondisk::{Copies, ManagerError, update_header};

/// What `volume resize` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resized {
    /// The size before.
    pub old_size: u64,
    /// The header now.
    pub header: Header,
    /// Whether a server held the volume's lease (it picks the new size up by itself).
    pub served: bool,
}

impl Manager<'_> {
    /// Grows volume `name` to `new_size` bytes (a multiple of its sector size).
    pub fn resize(&self, name: &str, new_size: u64) -> Result<Resized, ManagerError> {
        let (entry, loaded) = self.header(name)?;
        let h = loaded.header;
        if h.incomplete {
            return Err(ManagerError::Incomplete {
                volume: name.into(),
                done: h.progress,
                size: h.size,
            });
        }
        let sector = u64::from(h.sector_size);
        if new_size == 0 || !new_size.is_multiple_of(sector) {
            return Err(ManagerError::Refused(format!(
                "volume {name}: {new_size} bytes is not a positive multiple of its {sector}-byte sector size"
            )));
        }
        if new_size < h.size {
            return Err(ManagerError::Refused(format!(
                "volume {name} is {}; shrinking it to {} is refused: it would cut off the end of the file system on it (shrink the file system and copy it to a new, smaller volume instead)",
                crate::human::iec_bytes(h.size),
                crate::human::iec_bytes(new_size)
            )));
        }
        if new_size == h.size {
            return Ok(Resized {
                old_size: h.size,
                served: h.lease.is_some(),
                header: h,
            });
        }
        let store = self.open_backing(&entry.backing, false)?;
        let needed = DATA_OFFSET + new_size;
        let have = store
            .size()
            .map_err(super::ondisk::io("cannot find the size of", &entry.backing))?;
        if have < needed {
            store.extend_to(needed).map_err(|e| {
                if e.kind() == std::io::ErrorKind::Unsupported {
                    ManagerError::Refused(format!(
                        "volume {name}: its backing store {} is {} and cannot be grown by nbdcrypt (a block device or an upstream export); grow it to at least {} first (lvextend, rbd resize, qemu-img resize …), then run this again",
                        entry.backing.display(),
                        crate::human::iec_bytes(have),
                        crate::human::iec_bytes(needed)
                    ))
                } else {
                    ManagerError::Io {
                        what: "cannot extend",
                        path: entry.backing.clone(),
                        source: e,
                    }
                }
            })?;
        }
        let header = update_header(store.as_ref(), name, Copies::Both, |cur| {
            if cur.deleted {
                return Err(ManagerError::Deleted(name.into()));
            }
            if cur.size > new_size {
                return Err(ManagerError::Refused(format!(
                    "volume {name} grew to {} meanwhile; not shrinking it",
                    crate::human::iec_bytes(cur.size)
                )));
            }
            cur.size = new_size;
            Ok(true)
        })
        .map_err(|e| e.at(&entry.backing))?;
        tracing::info!(volume = name, from = h.size, to = new_size, "volume grown");
        Ok(Resized {
            old_size: h.size,
            served: header.lease.is_some(),
            header,
        })
    }
}
