//! Filling a volume's data area: preallocation with encrypted zeroes and wiping with random
//! bytes before the key is destroyed. Long operations: each reports progress per step.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use super::header::DATA_OFFSET;
use super::manager::{Manager, ManagerError};
use super::ondisk::io;
use crate::crypto::BackendChoice;
use crate::storage::FileStorage;

/// Bytes written per step of preallocation and wiping.
const WIPE_STEP: u64 = 8 << 20;

impl Manager<'_> {
    /// `volume create --preallocate`: writes encrypted zeroes over the whole data area (one
    /// `Decrypt` to open the volume), so that the backing store has every block allocated and
    /// its sparseness no longer shows which regions hold data. `progress` gets the bytes done
    /// after each step.
    pub fn preallocate(
        &self,
        name: &str,
        mut progress: impl FnMut(u64),
    ) -> Result<(), ManagerError> {
        let volume = self.open(name, BackendChoice::Auto, false)?;
        let err = |source| ManagerError::Volume {
            volume: name.into(),
            source,
        };
        let size = volume.size();
        let mut done = 0u64;
        while done < size {
            let n = WIPE_STEP.min(size - done);
            volume
                .write_zeroes(done, n, false, false, false)
                .map_err(err)?;
            done += n;
            progress(n);
        }
        volume.flush().map_err(err)
    }

    /// `volume delete --wipe`, first step: overwrites the data area with random bytes and syncs,
    /// before the key is destroyed. Useful on block devices (which are not removed) and where a
    /// policy asks for overwriting on top of crypto-shredding. `progress` as for preallocate.
    pub fn wipe_data(&self, name: &str, mut progress: impl FnMut(u64)) -> Result<(), ManagerError> {
        let entry = self.entry(name)?;
        if entry.deleted {
            return Err(ManagerError::Deleted(name.into()));
        }
        let len = FileStorage::open(&entry.backing, 0, true)
            .and_then(|s| s.len())
            .map_err(io("cannot open", &entry.backing))?;
        let f = OpenOptions::new()
            .write(true)
            .open(&entry.backing)
            .map_err(io("cannot open", &entry.backing))?;
        let mut buf = vec![0u8; usize::try_from(WIPE_STEP).unwrap_or(1 << 20)];
        let mut at = DATA_OFFSET;
        while at < len {
            let n = usize::try_from(WIPE_STEP.min(len - at)).unwrap_or(buf.len());
            getrandom::fill(&mut buf[..n]).map_err(|e| {
                io("cannot draw random bytes for", &entry.backing)(std::io::Error::other(
                    e.to_string(),
                ))
            })?;
            f.write_all_at(&buf[..n], at)
                .map_err(io("cannot overwrite", &entry.backing))?;
            at += n as u64;
            progress(n as u64);
        }
        f.sync_data().map_err(io("cannot sync", &entry.backing))
    }

    /// Bytes in the data area of a volume (what preallocate and wipe go over).
    pub fn data_bytes(&self, name: &str) -> Result<u64, ManagerError> {
        let entry = self.entry(name)?;
        let len = FileStorage::open(&entry.backing, 0, true)
            .and_then(|s| s.len())
            .map_err(io("cannot open", &entry.backing))?;
        Ok(len.saturating_sub(DATA_OFFSET))
    }
}
