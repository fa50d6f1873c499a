//! An encrypted volume: plaintext byte ranges ↔ encrypted sectors on a [`Storage`].
//!
//! A request is split, as in nbdkit's luks filter, into an unaligned head, an aligned body and
//! an unaligned tail. Reads decrypt the sectors they cover; writes of partial sectors are
//! read-modify-write. Every write holds striped sector locks: exclusive on stripes holding a
//! partial sector (so two unaligned writes into one sector never lose each other's bytes, and a
//! whole-sector write cannot slip between the read and the write of a read-modify-write),
//! shared elsewhere (whole-sector writes proceed in parallel). Reads take no lock.
//!
//! **Zero sectors.** A sector whose *ciphertext* is all zero bytes reads as plaintext zeroes.
//! Such sectors are holes (never written, trimmed, or zeroed with discards on); a real XTS
//! ciphertext is all zero with probability 2^-4096. This lets a fresh sparse file serve as an
//! empty volume, and lets `TRIM` punch holes. It adds no leak beyond what the sparse file
//! itself shows (see `docs/threat-model.md`).
//!
//! This module owns no key bytes: it holds an [`XtsEngine`], whose schedules are protected by
//! the crypto module.

// Casts from u64 to usize below are of in-memory lengths bounded by a request (at most 4 GiB,
// and 32 MiB after server validation) on 64-bit targets, the only ones nbdcrypt builds for.
#![allow(clippy::cast_possible_truncation)]

pub mod backing;
mod existing;
mod fill;
pub mod header;
mod holes;
mod journal;
pub mod lease;
pub mod lifecycle;
mod locks;
pub mod manager;
mod ondisk;
pub mod probe;
pub mod reencrypt;
pub mod resize;
mod span;
mod submit;

use std::io;

use crate::crypto::{CryptoError, SectorIndex, SectorSize, XtsEngine};
use crate::storage::Storage;

use locks::StripeLocks;
use span::Span;
pub use submit::{Ciphertext, Written};

/// Static properties of a volume.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// Size in bytes (a multiple of the sector size).
    pub size: u64,
    /// Encryption sector size.
    pub sector_size: SectorSize,
    /// `TRIM` and `BLOCK_STATUS` allowed (reveals unused sectors; off by default).
    pub discards: bool,
    /// Writes refused.
    pub read_only: bool,
    /// Byte offset of the encrypted data area in the backing store.
    pub data_offset: u64,
}

/// What went wrong in a volume operation (the server maps each to an NBD error value).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The backing store failed.
    #[error("backing store I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The crypto engine refused (a bug if it ever happens after validation).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The range is outside the volume.
    #[error("range {offset}+{len} is outside the {size}-byte volume")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// A write to a read-only volume.
    #[error("the volume is read-only")]
    ReadOnly,
    /// The operation is not available (e.g. a fast zero that would be slow).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The volume configuration is invalid.
    #[error("invalid volume: {0}")]
    Config(String),
    /// The volume was withdrawn (deleted or its key revoked) and its key destroyed.
    #[error("the volume was withdrawn and its key destroyed")]
    Withdrawn,
}

/// The most bytes zeroed (or encrypted as zeroes) per storage call.
const ZERO_CHUNK: usize = 1 << 20;

/// An encrypted volume.
#[derive(Debug)]
pub struct EncryptedVolume {
    storage: Box<dyn Storage>,
    /// `None` once [`EncryptedVolume::destroy_key`] ran. Each cipher call holds the read lock
    /// only for its own pass (never across I/O), so destroying waits for at most the passes
    /// under way, however many requests still hold the volume.
    engine: std::sync::RwLock<Option<XtsEngine>>,
    /// Engine facts kept for logs after the key is gone.
    summary: String,
    /// The engine's backend.
    backend: crate::crypto::BackendKind,
    config: VolumeConfig,
    /// The size now: `config.size` until [`EncryptedVolume::grow`] (`volume resize` of a served
    /// volume). Connections keep the size they negotiated.
    size: std::sync::atomic::AtomicU64,
    locks: StripeLocks,
}

/// Ciphertext of whole sectors, ready for [`EncryptedVolume::write_sealed`]: only
/// [`EncryptedVolume::seal_aligned`] makes one.
#[derive(Debug)]
pub struct Sealed<'d> {
    offset: u64,
    data: &'d [u8],
}

impl EncryptedVolume {
    /// A volume over `storage`, encrypted by `engine`.
    pub fn new(
        storage: Box<dyn Storage>,
        engine: XtsEngine,
        config: VolumeConfig,
    ) -> Result<Self, VolumeError> {
        let sector = config.sector_size.bytes() as u64;
        if engine.sector_size() != config.sector_size {
            return Err(VolumeError::Config(
                "engine and volume sector sizes differ".into(),
            ));
        }
        if config.size == 0 || !config.size.is_multiple_of(sector) {
            return Err(VolumeError::Config(format!(
                "size {} is not a positive multiple of the {sector}-byte sector size",
                config.size
            )));
        }
        if !config.data_offset.is_multiple_of(4096) {
            return Err(VolumeError::Config(
                "data offset must be 4096-aligned".into(),
            ));
        }
        Ok(EncryptedVolume {
            storage,
            summary: engine.summary(),
            backend: engine.backend_kind(),
            engine: std::sync::RwLock::new(Some(engine)),
            size: std::sync::atomic::AtomicU64::new(config.size),
            config,
            locks: StripeLocks::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VolumeConfig {
        &self.config
    }

    /// Size in bytes (what new connections are told).
    pub fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Grows the volume to `new_size` bytes (a multiple of the sector size; the store must
    /// already hold them). Never shrinks: returns whether the size changed.
    pub fn grow(&self, new_size: u64) -> Result<bool, VolumeError> {
        let sector = self.config.sector_size.bytes() as u64;
        if !new_size.is_multiple_of(sector) {
            return Err(VolumeError::Config(format!(
                "size {new_size} is not a multiple of the {sector}-byte sector size"
            )));
        }
        let old = self
            .size
            .fetch_max(new_size, std::sync::atomic::Ordering::AcqRel);
        Ok(new_size > old)
    }

    /// Whether every store call is a network round trip (see [`Storage::is_remote`]).
    pub fn store_is_remote(&self) -> bool {
        self.storage.is_remote()
    }

    /// Whether the backing store serializes writes anyway (see [`Storage::serializes_writes`]).
    pub fn serializes_writes(&self) -> bool {
        self.storage.serializes_writes()
    }

    /// The crypto backend's name (`vaes`, `hw`, `portable`).
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The crypto engine's one-line description (for the startup log).
    pub fn engine_summary(&self) -> String {
        self.summary.clone()
    }

    /// Runs `f` with the engine, or fails with [`VolumeError::Withdrawn`] once the key is
    /// destroyed.
    fn with_engine<T>(
        &self,
        f: impl FnOnce(&XtsEngine) -> Result<T, CryptoError>,
    ) -> Result<T, VolumeError> {
        let guard = self.engine.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(engine) => Ok(f(engine)?),
            None => Err(VolumeError::Withdrawn),
        }
    }

    /// Destroys the key schedules now (they are wiped as the engine drops): every later
    /// request fails with [`VolumeError::Withdrawn`]. Waits only for cipher passes under way.
    pub fn destroy_key(&self) {
        let engine = self
            .engine
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(engine);
    }

    /// Whether [`EncryptedVolume::destroy_key`] ran.
    pub fn is_withdrawn(&self) -> bool {
        self.engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// The backing store (for header I/O and the serving lock).
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    fn sector(&self) -> u64 {
        self.config.sector_size.bytes() as u64
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(VolumeError::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    fn check_writable(&self) -> Result<(), VolumeError> {
        if self.config.read_only {
            Err(VolumeError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Reads and decrypts whole sectors `first..` into `buf` (a multiple of the sector size):
    /// straight from where the store holds them when it can ([`Storage::read_in_place`]),
    /// else read into `buf` and decrypted there. All-zero ciphertext sectors read as zeroes
    /// (holes).
    fn read_sectors(&self, first: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let sb = self.sector() as usize;
        let at = self.config.data_offset + first * sb as u64;
        let mut result = Ok(());
        let in_place = self
            .storage
            .read_in_place(at, buf.len(), &mut |piece, src| {
                if result.is_ok() {
                    let dst = &mut buf[piece..piece + src.len()];
                    result = self.decrypt_from(first + (piece / sb) as u64, src, dst);
                }
            })?;
        if in_place {
            return result;
        }
        self.storage.read_at(buf, at)?;
        self.decrypt_in_place(first, buf)
    }

    /// Decrypts whole sectors `buf` (ciphertext of sectors `first..`) in place; all-zero
    /// sectors stay zero.
    fn decrypt_in_place(&self, first: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let sb = self.sector() as usize;
        let mut i = 0;
        while i < buf.len() / sb {
            let (end, zero) = span::run_at(buf, sb, i);
            if !zero {
                // The whole run of non-zero sectors in one call (batching).
                let run = &mut buf[i * sb..end * sb];
                self.with_engine(|e| e.decrypt_sectors(SectorIndex(first + i as u64), run))?;
            }
            i = end;
        }
        Ok(())
    }

    /// Decrypts whole sectors `src` (ciphertext of sectors `first..`) into `dst`; all-zero
    /// sectors become zero.
    fn decrypt_from(&self, first: u64, src: &[u8], dst: &mut [u8]) -> Result<(), VolumeError> {
        let sb = self.sector() as usize;
        let mut i = 0;
        while i < src.len() / sb {
            let (end, zero) = span::run_at(src, sb, i);
            let (from, to) = (&src[i * sb..end * sb], &mut dst[i * sb..end * sb]);
            if zero {
                to.fill(0);
            } else {
                self.with_engine(|e| {
                    e.decrypt_sectors_to(SectorIndex(first + i as u64), from, to)
                })?;
            }
            i = end;
        }
        Ok(())
    }

    /// Encrypts plaintext `buf` (whole sectors) in place and writes it at sector `first`.
    fn write_sectors(&self, first: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.with_engine(|e| e.encrypt_sectors(SectorIndex(first), buf))?;
        self.storage
            .write_at(buf, self.config.data_offset + first * self.sector())?;
        Ok(())
    }

    /// Reads `buf.len()` plaintext bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let sector = self.sector();
        let span = Span::new(offset, buf.len() as u64, sector);
        if span.head_skip == 0 && (buf.len() as u64).is_multiple_of(sector) {
            // Aligned: decrypt straight into the caller's buffer, no copy.
            return self.read_sectors(span.first, buf);
        }
        let mut covering = vec![0u8; (span.count * sector) as usize];
        self.read_sectors(span.first, &mut covering)?;
        buf.copy_from_slice(&covering[span.head_skip..span.head_skip + buf.len()]);
        Ok(())
    }

    /// Writes plaintext `data` at `offset`. `data` is used as scratch (encrypted in place) when
    /// the write is sector-aligned. With `fua`, the data is durable before this returns.
    pub fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), VolumeError> {
        self.check_writable()?;
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return self.finish(fua);
        }
        let sector = self.sector();
        let span = Span::new(offset, data.len() as u64, sector);
        let _guard =
            self.locks
                .lock_for_write(span.first, span.count, span.head_partial, span.tail_partial);
        if !span.head_partial && !span.tail_partial {
            self.write_sectors(span.first, data)?;
        } else {
            let sb = sector as usize;
            let mut covering = vec![0u8; (span.count * sector) as usize];
            // Only the partial end sectors need their old contents.
            if span.head_partial {
                self.read_sectors(span.first, &mut covering[..sb])?;
            }
            if span.tail_partial && (span.count > 1 || !span.head_partial) {
                let last = covering.len() - sb;
                self.read_sectors(span.first + span.count - 1, &mut covering[last..])?;
            }
            covering[span.head_skip..span.head_skip + data.len()].copy_from_slice(data);
            self.write_sectors(span.first, &mut covering)?;
        }
        self.finish(fua)
    }

    /// Encrypts sector-aligned plaintext `data` for `offset` (both multiples of the sector
    /// size) in place, handing the cipher pass to `par`, which may run it on disjoint pieces in
    /// parallel: `par` gets the buffer and an encryptor taking a piece's byte offset within the
    /// buffer (a multiple of the sector size) and the piece. Takes **no lock**: this is where a
    /// thread pool may be called, and a lock held across a pool call can deadlock (a worker
    /// waiting in the pool's join may steal a job that needs that lock). The ciphertext of a
    /// whole sector does not depend on what the sector held, so it needs none. Write the result
    /// with [`EncryptedVolume::write_sealed`].
    pub fn seal_aligned<'d, P>(
        &self,
        offset: u64,
        data: &'d mut [u8],
        par: P,
    ) -> Result<Sealed<'d>, VolumeError>
    where
        P: FnOnce(
            &mut [u8],
            &(dyn Fn(usize, &mut [u8]) -> Result<(), VolumeError> + Sync),
        ) -> Result<(), VolumeError>,
    {
        self.check_writable()?;
        self.check(offset, data.len() as u64)?;
        let sector = self.sector();
        if !offset.is_multiple_of(sector) || !(data.len() as u64).is_multiple_of(sector) {
            return Err(VolumeError::Config(
                "unaligned request on the aligned path".into(),
            ));
        }
        let first = offset / sector;
        let encrypt = |at: usize, piece: &mut [u8]| -> Result<(), VolumeError> {
            if !(at as u64).is_multiple_of(sector) {
                return Err(VolumeError::Config("piece not on a sector boundary".into()));
            }
            self.with_engine(|e| e.encrypt_sectors(SectorIndex(first + at as u64 / sector), piece))
        };
        if !data.is_empty() {
            par(data, &encrypt)?;
        }
        Ok(Sealed { offset, data })
    }

    /// Writes what [`EncryptedVolume::seal_aligned`] encrypted, under the stripe locks (shared:
    /// whole sectors), in one store call: buffered writes to one file serialize on its inode
    /// lock in the kernel, so parallel writes of the pieces would only contend. Takes no
    /// closure, so nothing can run in a pool while the locks are held.
    pub fn write_sealed(&self, sealed: Sealed<'_>, fua: bool) -> Result<(), VolumeError> {
        if sealed.data.is_empty() {
            return self.finish(fua);
        }
        let sector = self.sector();
        let first = sealed.offset / sector;
        let count = sealed.data.len() as u64 / sector;
        {
            let _guard = self.locks.lock_for_write(first, count, false, false);
            self.store_sealed(sealed.offset, sealed.data)?;
        }
        self.finish(fua)
    }

    /// Stores ciphertext sealed for `offset` (the caller holds its stripes). Withdrawn since
    /// it was sealed: writes nothing under a destroyed key's name.
    fn store_sealed(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        if self.is_withdrawn() {
            return Err(VolumeError::Withdrawn);
        }
        self.storage
            .write_at(data, self.config.data_offset + offset)?;
        Ok(())
    }

    /// `CACHE`: asks the store to read the sectors covering the range ahead (advisory; a store
    /// that cannot simply ignores it).
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check(offset, len)?;
        let sector = self.sector();
        let first = offset / sector * sector;
        let end = (offset + len).div_ceil(sector) * sector;
        self.storage
            .prefetch(self.config.data_offset + first, end - first)?;
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), VolumeError> {
        self.storage.sync()?;
        Ok(())
    }

    pub(super) fn finish(&self, fua: bool) -> Result<(), VolumeError> {
        if fua { self.flush() } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests;
