//! Ciphertext bytes on a backing store. This module knows no keys and never sees plaintext.
//!
//! [`FileStorage`] serves a regular file (sparse or preallocated) or a raw block device through
//! positional I/O (`pwrite`, `pread`), so concurrent requests need no shared file offset and no
//! lock. Reads of a regular file decrypt from a read-only mapping of it instead (one pass over
//! the bytes instead of two); an `EIO` or a truncation there, which mmap turns into `SIGBUS`,
//! is caught and becomes the same error reply a `pread` gives ([`view`], [`sigbus`]). Writes
//! never go through a mapping: a failed write-back there (`ENOSPC`) could not be reported to
//! the write's client at all.

mod file;
mod mapped;
mod memory;
mod sigbus;
mod view;

pub use file::FileStorage;
pub use mapped::MappedRange;
pub use memory::MemoryStorage;

/// One run of the backing store, as `SEEK_DATA`/`SEEK_HOLE` see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run.
    pub len: u64,
    /// The run is a hole (reads as zeroes, occupies no space).
    pub hole: bool,
}

/// Advisory locks a store can hold for the volume layer. On files and block devices they are
/// Linux open-file-description locks (`F_OFD_SETLK`) on single bytes of the header's reserved
/// area: they never touch data, conflict between processes *and* between two opens in one
/// process, and vanish when the holder's descriptor closes, so a crashed server leaves none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreLock {
    /// Held for as long as a process serves (or administers) the volume: one writer.
    Serving,
    /// Held around each read-modify-write of the header copies, so that two processes'
    /// updates (a lease renewal and a `volume delete`) never lose each other.
    Header,
}

impl StoreLock {
    /// The byte the lock covers (inside the reserved area between the header copies and the
    /// data area; the bytes themselves are never written through a lock).
    pub fn byte(self) -> u64 {
        match self {
            StoreLock::Serving => 8192,
            StoreLock::Header => 8193,
        }
    }
}

/// A store of ciphertext bytes.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`. Bytes past the end of a shorter file read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync(&self) -> std::io::Result<()>;
    /// Deallocates `offset..offset+len`; it reads back as zeroes. `Unsupported` where the store
    /// cannot.
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Data and hole runs covering `offset..offset+len`.
    fn extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<Extent>>;
    /// Whether concurrent writes are serialized below us anyway (a regular file's buffered
    /// writes hold its inode lock), so that issuing them in parallel buys nothing.
    fn serializes_writes(&self) -> bool {
        false
    }
    /// Whether every call is a network round trip (an upstream NBD export): such a store is
    /// never called from a tokio worker, however small the request.
    fn is_remote(&self) -> bool {
        false
    }
    /// The store's length in bytes.
    fn size(&self) -> std::io::Result<u64>;
    /// Starts reading `offset..offset+len` ahead of use (advisory; the default does nothing).
    fn prefetch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Writes `buf` at `offset` and makes that write durable before returning, without
    /// flushing the rest of the store (header updates while serving).
    fn write_durable_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.write_at(buf, offset)?;
        self.sync()
    }
    /// Takes `lock` exclusively; `wait` blocks until it is free. `Ok(false)`: held elsewhere
    /// (only without `wait`). Stores that have no locks grant every request.
    fn lock(&self, lock: StoreLock, wait: bool) -> std::io::Result<bool> {
        let _ = (lock, wait);
        Ok(true)
    }
    /// Releases `lock` (a no-op when not held).
    fn unlock(&self, lock: StoreLock) -> std::io::Result<()> {
        let _ = lock;
        Ok(())
    }
    /// Whether the store can lock at all (files and devices can; a network store cannot).
    fn has_locks(&self) -> bool {
        false
    }
    /// Makes the store at least `len` bytes long (sparse; the new bytes read as zeroes), where
    /// the store can grow itself: a regular file. A device or an export is grown by its owner
    /// (`Unsupported` here).
    fn extend_to(&self, len: u64) -> std::io::Result<()> {
        let _ = len;
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// `len` bytes from `offset` (page aligned) mapped read-only, where the store is a regular
    /// file; `None` elsewhere (callers read instead). See [`MappedRange`] for why only
    /// crash-safe passes may use it.
    fn map_range(&self, offset: u64, len: usize) -> std::io::Result<Option<MappedRange>> {
        let _ = (offset, len);
        Ok(None)
    }
    /// Calls `f(at, bytes)` with the stored bytes of `offset..offset+len` where they already
    /// are (a mapping of the page cache, a reply buffer), piece by piece in order; `at` is the
    /// piece's place in the range, a multiple of 4096. `Ok(false)`, and `f` not called or its
    /// work to be discarded, where the store cannot (the caller then reads).
    fn read_in_place(
        &self,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(usize, &[u8]),
    ) -> std::io::Result<bool> {
        let _ = (offset, len, f);
        Ok(false)
    }
    /// Starts reading `offset..offset+len` without waiting for it: `done` runs later, on
    /// another thread, with the stored bytes, or with `None` if the read failed (the caller
    /// then reads the waiting way, which reports the error). Stores that have nothing to wait
    /// for on a network (files, devices, memory) hand `done` back, as does a store that cannot
    /// start this read.
    fn submit_read(&self, offset: u64, len: usize, done: ReadDone) -> Result<(), ReadDone> {
        let _ = (offset, len);
        Err(done)
    }
    /// Starts writing `data` at `offset` without waiting for it: `done` runs later, on another
    /// thread, with `Some` once the store acknowledged the write, or with `None` if it failed
    /// (the caller then writes `data` again the waiting way, which reports the error). The
    /// store holds on to `data` until it is sent; the caller must not change it meanwhile (it
    /// is shared, so it cannot). With `fua` the store acknowledges only once the data is
    /// durable (NBD's `FUA` flag upstream). Stores with nothing to wait for on a network hand
    /// `done` back, as does a store that cannot start this write (nor honour `fua`).
    fn submit_write(
        &self,
        offset: u64,
        data: WriteData,
        fua: bool,
        done: ReadDone,
    ) -> Result<(), ReadDone> {
        let _ = (offset, data, fua);
        Err(done)
    }
}

/// The completion of [`Storage::submit_read`] and [`Storage::submit_write`]: `Some` with the
/// buffer holding exactly the bytes read (empty for a write), or `None` when the request
/// failed. The completion may exchange that buffer for another of the same length (its own
/// allocation, [`Vec`]'s `swap`) to keep the bytes without copying them: the store reuses
/// whatever buffer it gets back.
pub type ReadDone = Box<dyn FnOnce(Option<&mut Vec<u8>>) + Send>;

/// A buffer a submitted read can land in without a copy: it takes over the store's receive
/// buffer ([`ReadDone`]) by exchanging allocations with it.
pub trait ReadBuffer: std::ops::DerefMut<Target = [u8]> {
    /// Exchanges allocations with `received`, which holds exactly `self.len()` bytes: `self`
    /// then holds them, and `received` a buffer the store may reuse. False (nothing changed)
    /// when this buffer cannot.
    fn take_over(&mut self, received: &mut Vec<u8>) -> bool;
}

impl ReadBuffer for Vec<u8> {
    fn take_over(&mut self, received: &mut Vec<u8>) -> bool {
        if received.len() != self.len() {
            return false;
        }
        std::mem::swap(self, received);
        true
    }
}

/// The bytes of a submitted write, shared by the store (until they are sent) and the caller
/// (which writes them again if the write fails).
pub type WriteData = std::sync::Arc<dyn std::ops::Deref<Target = [u8]> + Send + Sync>;

/// A shared store (tests keep a handle to inspect the ciphertext a volume wrote).
impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        (**self).sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<Extent>> {
        (**self).extents(offset, len)
    }
    fn serializes_writes(&self) -> bool {
        (**self).serializes_writes()
    }
    fn is_remote(&self) -> bool {
        (**self).is_remote()
    }
    fn size(&self) -> std::io::Result<u64> {
        (**self).size()
    }
    fn prefetch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        (**self).prefetch(offset, len)
    }
    fn write_durable_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        (**self).write_durable_at(buf, offset)
    }
    fn lock(&self, lock: StoreLock, wait: bool) -> std::io::Result<bool> {
        (**self).lock(lock, wait)
    }
    fn extend_to(&self, len: u64) -> std::io::Result<()> {
        (**self).extend_to(len)
    }
    fn map_range(&self, offset: u64, len: usize) -> std::io::Result<Option<MappedRange>> {
        (**self).map_range(offset, len)
    }
    fn unlock(&self, lock: StoreLock) -> std::io::Result<()> {
        (**self).unlock(lock)
    }
    fn read_in_place(
        &self,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(usize, &[u8]),
    ) -> std::io::Result<bool> {
        (**self).read_in_place(offset, len, f)
    }
    fn submit_read(&self, offset: u64, len: usize, done: ReadDone) -> Result<(), ReadDone> {
        (**self).submit_read(offset, len, done)
    }
    fn submit_write(
        &self,
        offset: u64,
        data: WriteData,
        fua: bool,
        done: ReadDone,
    ) -> Result<(), ReadDone> {
        (**self).submit_write(offset, data, fua, done)
    }
    fn has_locks(&self) -> bool {
        (**self).has_locks()
    }
}
