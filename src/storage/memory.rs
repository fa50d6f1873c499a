//! Ciphertext in memory, for tests: a growable byte vector behind a mutex.

use std::io;
use std::sync::Mutex;

use super::{Extent, Storage};

/// In-memory storage. Holes are runs of zero bytes.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    bytes: Mutex<Vec<u8>>,
}

impl MemoryStorage {
    /// An empty store of `len` zero bytes.
    pub fn new(len: usize) -> Self {
        MemoryStorage {
            bytes: Mutex::new(vec![0; len]),
        }
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn range(offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
    let start =
        usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(start..start + len)
}

impl Storage for MemoryStorage {
    fn serializes_writes(&self) -> bool {
        // One mutex guards the bytes.
        true
    }

    fn extend_to(&self, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let len = usize::try_from(len).map_err(io::Error::other)?;
        if bytes.len() < len {
            bytes.resize(len, 0);
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.bytes.lock().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let r = range(offset, buf.len())?;
        buf.fill(0);
        let avail_end = r.end.min(bytes.len());
        if r.start < avail_end {
            buf[..avail_end - r.start].copy_from_slice(&bytes[r.start..avail_end]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let r = range(offset, buf.len())?;
        if bytes.len() < r.end {
            bytes.resize(r.end, 0);
        }
        bytes[r].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let r = range(offset, len)?;
        let end = r.end.min(bytes.len());
        if r.start < end {
            bytes[r.start..end].fill(0);
        }
        Ok(())
    }

    fn extents(&self, _offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent { len, hole: false }])
    }
}
