//! A read-only memory mapping of part of a regular backing file, for whole-volume passes that
//! read every byte once (`volume reencrypt`): the cipher reads the page cache directly instead
//! of a copy of it, which is one of the two copies that bound such a pass otherwise.
//!
//! Read-only on purpose: a pass that rewrote the mapping in place would put whatever is there
//! mid-computation (plaintext, half-written sectors) into the page cache, where write-back or
//! a `kill -9` could make it durable. Writes go through `pwrite`, which a kill interrupts only
//! between pages.
//!
//! An I/O error or a truncation of the file under the mapping raises `SIGBUS` on access; the
//! mapping is registered with [`super::sigbus`], which turns that into a mark ([`faulted`]),
//! as for serving's [`super::view`]. A pass that finds the mark discards what it computed from
//! the mapping and reads the range again with `pread`, which reports the error as an error (or
//! reads the zeroes of a shorter file). So a bad disk ends `volume reencrypt` with a message
//! naming the volume, never with a signal.
//!
//! [`faulted`]: MappedRange::faulted
#![allow(unsafe_code)]

use super::sigbus::Guard;
use std::fs::File;
use std::io;

/// `len` bytes of a file from `offset`, mapped shared and read-only. Field order matters: the
/// guard is unregistered before the mapping is unmapped.
#[derive(Debug)]
pub struct MappedRange {
    guard: Guard,
    map: memmap2::Mmap,
}

impl MappedRange {
    /// Maps `file` at `offset` (a multiple of the page size). Pages fault in on first access,
    /// in whichever thread touches them (a parallel pass faults in parallel). `None` when no
    /// `SIGBUS` guard is available (the caller reads instead).
    pub(super) fn new(file: &File, offset: u64, len: usize) -> io::Result<Option<MappedRange>> {
        // SAFETY: a shared read-only mapping; the slice it yields must not change underneath
        // while borrowed. Its only users are volume commands that hold the store's exclusive
        // serving lock, so no nbdcrypt server or command writes the file meanwhile, and the
        // pass itself writes only ranges whose mapping it has dropped or no longer reads. A
        // foreign process that writes into it races as it would with pread. Truncation and
        // I/O errors raise SIGBUS, which the guard registered below (before any access,
        // dropped before the unmap) turns into `faulted`.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(file)?
        };
        let Some(guard) = Guard::register(map.as_ptr() as usize, map.len()) else {
            return Ok(None);
        };
        Ok(Some(MappedRange { guard, map }))
    }

    /// Whether an access has faulted since the mapping was made: everything read through
    /// [`bytes`](Self::bytes) is then void (a faulted page reads as zeroes).
    pub fn faulted(&self) -> bool {
        self.guard.faulted()
    }

    /// The mapped bytes. Check [`faulted`](Self::faulted) after reading them.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}
