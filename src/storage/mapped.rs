//! A read-only memory mapping of part of a regular backing file, for whole-volume passes that
//! read every byte once (`volume reencrypt`): the cipher reads the page cache directly instead
//! of a copy of it, which is one of the two copies that bound such a pass otherwise.
//!
//! Read-only on purpose: a pass that rewrote the mapping in place would put whatever is there
//! mid-computation (plaintext, half-written sectors) into the page cache, where write-back or
//! a `kill -9` could make it durable. Writes go through `pwrite`, which a kill interrupts only
//! between pages.
//!
//! Not for serving (serving reads use [`super::view`], whose mapping is guarded): an I/O error
//! or a truncation of a mapped file arrives here as `SIGBUS`, which kills the process. A pass
//! that uses these mappings must therefore be crash-safe and resumable by design (the re-key
//! journal is), so that `SIGBUS` costs no more than a `kill -9`.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

/// `len` bytes of a file from `offset`, mapped shared and read-only.
#[derive(Debug)]
pub struct MappedRange {
    map: memmap2::Mmap,
}

impl MappedRange {
    /// Maps `file` at `offset` (a multiple of the page size). Pages fault in on first access,
    /// in whichever thread touches them (a parallel pass faults in parallel).
    pub(super) fn new(file: &File, offset: u64, len: usize) -> io::Result<MappedRange> {
        // SAFETY: a shared read-only mapping; the slice it yields must not change underneath
        // while borrowed. Its only users are volume commands that hold the store's exclusive
        // serving lock, so no nbdcrypt server or command writes the file meanwhile, and the
        // pass itself writes only ranges whose mapping it has dropped or no longer reads. A
        // foreign process that truncates the file makes an access raise SIGBUS, which ends this
        // process like a crash (the pass is resumable by design); one that writes into it
        // races as it would with pread.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(file)?
        };
        Ok(MappedRange { map })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}
