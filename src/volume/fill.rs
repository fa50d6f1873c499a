//! Filling a volume's data area: preallocation with encrypted zeroes and wiping with random
//! bytes before the key is destroyed. Long operations: each reports progress per step.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::header::DATA_OFFSET;
use super::lease::lock_for_change;
use super::manager::{Manager, ManagerError};
use super::ondisk::{Copies, io, update_header};
use crate::crypto::BackendChoice;
use crate::storage::Storage;

/// Bytes written per step of preallocation and wiping.
const WIPE_STEP: u64 = 8 << 20;
/// Preallocation records its progress in the header this often (after a flush), so an
/// interrupted one resumes from there.
pub const CHECKPOINT_BYTES: u64 = 64 << 20;

impl Manager<'_> {
    /// `volume create --preallocate` (and `--resume`): writes encrypted zeroes over the data
    /// area from the header's checkpoint on (one `Decrypt` to open the volume), so that the
    /// backing store has every block allocated and its sparseness no longer shows which
    /// regions hold data. Every [`CHECKPOINT_BYTES`] the data is flushed and the checkpoint
    /// recorded in the header; when `stop` turns true (Ctrl-C) it checkpoints and returns
    /// `Ok(false)`, leaving the volume incomplete and resumable. `progress` gets the bytes done
    /// (first the checkpoint it starts from). `Ok(true)`: finished, the volume is complete.
    pub fn preallocate(
        &self,
        name: &str,
        mut progress: impl FnMut(u64),
        stop: &AtomicBool,
    ) -> Result<bool, ManagerError> {
        let (entry, store, h) = self.open_store(name, false)?;
        if !h.incomplete {
            return Err(ManagerError::Refused(format!(
                "volume {name} is complete; preallocation happens only while it is created"
            )));
        }
        lock_for_change(store.as_ref(), name, "; wait for it to finish")
            .map_err(|e| e.at(&entry.backing))?;
        let engine = self.unwrap_engine(name, &h, BackendChoice::Auto)?;
        let volume = self.volume_over(name, Box::new(Arc::clone(&store)), engine, &h, false)?;
        let err = |source| ManagerError::Volume {
            volume: name.into(),
            source,
        };
        let size = volume.size();
        let sector = volume.config().sector_size.bytes() as u64;
        let mut done = h.progress.min(size) / sector * sector;
        progress(done);
        let mut since_checkpoint = 0u64;
        let checkpoint = |done: u64| -> Result<(), ManagerError> {
            volume.flush().map_err(err)?;
            update_header(store.as_ref(), name, Copies::Older, |h| {
                h.progress = done;
                Ok(true)
            })
            .map(|_| ())
        };
        while done < size {
            if stop.load(Ordering::Relaxed) {
                checkpoint(done)?;
                return Ok(false);
            }
            let n = WIPE_STEP.min(size - done);
            volume
                .write_zeroes(done, n, false, false, false)
                .map_err(err)?;
            done += n;
            since_checkpoint += n;
            progress(n);
            if since_checkpoint >= CHECKPOINT_BYTES && done < size {
                checkpoint(done)?;
                since_checkpoint = 0;
                crate::faults::crash_point("preallocate-checkpoint");
            }
        }
        volume.flush().map_err(err)?;
        self.complete(name, store.as_ref())?;
        Ok(true)
    }

    /// `volume delete --wipe`, first step: overwrites the data area with random bytes and syncs,
    /// before the key is destroyed. Useful on block devices (which are not removed) and where a
    /// policy asks for overwriting on top of crypto-shredding. `progress` as for preallocate.
    pub fn wipe_data(
        &self,
        name: &str,
        force: bool,
        mut progress: impl FnMut(u64),
    ) -> Result<(), ManagerError> {
        let entry = self.entry(name)?;
        if entry.deleted {
            return Err(ManagerError::Deleted(name.into()));
        }
        let store = self.open_backing(&entry.backing, false)?;
        match lock_for_change(
            store.as_ref(),
            name,
            "; stop that server first, or add --force to wipe and delete it under its clients",
        ) {
            Ok(()) => {}
            Err(ManagerError::Busy { .. }) if force => {}
            Err(e) => return Err(e.at(&entry.backing)),
        }
        let len = store.size().map_err(io("cannot open", &entry.backing))?;
        let mut buf = vec![0u8; usize::try_from(WIPE_STEP).unwrap_or(1 << 20)];
        let mut at = DATA_OFFSET;
        while at < len {
            let n = usize::try_from(WIPE_STEP.min(len - at)).unwrap_or(buf.len());
            getrandom::fill(&mut buf[..n]).map_err(|e| {
                io("cannot draw random bytes for", &entry.backing)(std::io::Error::other(
                    e.to_string(),
                ))
            })?;
            store
                .write_at(&buf[..n], at)
                .map_err(io("cannot overwrite", &entry.backing))?;
            at += n as u64;
            progress(n as u64);
        }
        store.sync().map_err(io("cannot sync", &entry.backing))
    }

    /// Bytes in the data area of a volume (what preallocate and wipe go over).
    pub fn data_bytes(&self, name: &str) -> Result<u64, ManagerError> {
        let entry = self.entry(name)?;
        let len = self
            .open_backing(&entry.backing, true)?
            .size()
            .map_err(io("cannot open", &entry.backing))?;
        Ok(len.saturating_sub(DATA_OFFSET))
    }
}
