//! Ciphertext bytes on a backing store. This module knows no keys and never sees plaintext.
//!
//! [`FileStorage`] serves a regular file (sparse or preallocated) or a raw block device through
//! positional I/O (`pread`/`pwrite`), so concurrent requests need no shared file offset and no
//! lock. mmap is deliberately not used: it turns `ENOSPC`/`EIO` into `SIGBUS`, which would take
//! the whole server down; positional I/O turns them into error values that become NBD error
//! replies.

mod file;
mod memory;

pub use file::FileStorage;
pub use memory::MemoryStorage;

/// One run of the backing store, as `SEEK_DATA`/`SEEK_HOLE` see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run.
    pub len: u64,
    /// The run is a hole (reads as zeroes, occupies no space).
    pub hole: bool,
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
}

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
}
