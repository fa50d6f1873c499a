//! A read-only mapping of a whole backing file that serving reads decrypt from: the cipher
//! reads the page cache in place, so a read costs one pass over the bytes (decrypt into the
//! reply) instead of two (`pread` into the reply, then decrypt it in place). That pass is what
//! separated an encrypted read from an unencrypted server's (docs/performance.md).
//!
//! The mapping never turns an error into a crash (the reason serving used to avoid mmap): a
//! page that cannot be read (an I/O error; a file truncated under us) raises `SIGBUS`, which
//! [`super::sigbus`] turns into a mark on this mapping; the reader discards what it read and
//! reads through `pread`, which reports the error as an error reply (or reads the zeroes of a
//! shorter file), and the mapping is never read again. The kernel's `MADV_POPULATE_READ`
//! would report such errors before the access, but it costs a page-table walk per request:
//! measured, 4 KiB random reads lost 15 % with it, and 1 MiB reads a fifth of their gain. An
//! error is rare and costs this volume its mapping; the check would cost every read.
//!
//! Writes never go through the mapping (they stay `pwrite`); a shared mapping of a file shows
//! every completed `pwrite` at once (Linux has one page cache for both).
#![allow(unsafe_code)]

use super::sigbus::Guard;
use std::fs::File;
use std::io;

/// The mapping of `0..len` of a file. Field order matters: the guard is unregistered before
/// the mapping is unmapped.
#[derive(Debug)]
pub(super) struct ReadView {
    guard: Guard,
    map: memmap2::Mmap,
}

/// What a read through the view came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ViewRead {
    /// `f` saw the stored bytes.
    Done,
    /// Not read through the view (outside it): read with `pread`.
    Declined,
    /// An access faulted: what `f` saw is void, and this view is retired.
    Faulted,
}

impl ReadView {
    /// Maps the first `len` bytes of `file` (shared, read-only). `None` when no `SIGBUS` guard
    /// is available.
    pub(super) fn new(file: &File, len: usize) -> io::Result<Option<ReadView>> {
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: a shared, read-only mapping. Its bytes change underneath only through the
        // file: this process's own `pwrite`s of other requests (NBD leaves a read that
        // overlaps an in-flight write unspecified, and `pread` would tear the same way) and
        // foreign writers, which the serving lock keeps away. Truncation and I/O errors raise
        // SIGBUS, which the guard registered below turns into `Faulted`; the guard is
        // registered before any access and dropped before the unmap.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(file)? };
        let Some(guard) = Guard::register(map.as_ptr() as usize, map.len()) else {
            return Ok(None);
        };
        Ok(Some(ReadView { guard, map }))
    }

    /// Bytes mapped.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether an access has faulted (the view is then never read again).
    pub(super) fn faulted(&self) -> bool {
        self.guard.faulted()
    }

    /// Calls `f` with `offset..offset+len` of the file, in place.
    pub(super) fn read_with(&self, offset: u64, len: usize, f: &mut dyn FnMut(&[u8])) -> ViewRead {
        if self.faulted() {
            return ViewRead::Faulted;
        }
        let Some((start, end)) = usize::try_from(offset)
            .ok()
            .and_then(|s| Some((s, s.checked_add(len)?)))
            .filter(|&(_, e)| e <= self.map.len())
        else {
            return ViewRead::Declined;
        };
        if len == 0 {
            return ViewRead::Declined;
        }
        f(&self.map[start..end]);
        if self.faulted() {
            ViewRead::Faulted
        } else {
            ViewRead::Done
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(tag: &str, len: usize) -> (std::path::PathBuf, File, Vec<u8>) {
        let p = std::env::temp_dir().join(format!("nbdcrypt-view-{}-{tag}", std::process::id()));
        let data: Vec<u8> = (0..len).map(|i| ((i * 7 + 3) % 251) as u8).collect();
        let mut f = File::create(&p).unwrap();
        f.write_all(&data).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        (p, f, data)
    }

    fn read(v: &ReadView, offset: u64, len: usize) -> (ViewRead, Vec<u8>) {
        let mut got = Vec::new();
        let r = v.read_with(offset, len, &mut |b| got = b.to_vec());
        (r, got)
    }

    #[test]
    fn view_reads_the_file_in_place_and_declines_past_its_end() {
        let (p, f, data) = file("read", 1 << 20);
        let v = ReadView::new(&f, data.len()).unwrap().unwrap();
        let (r, got) = read(&v, 12345, 70000);
        assert_eq!(r, ViewRead::Done);
        assert!(got == data[12345..12345 + 70000]);
        assert_eq!(read(&v, (1 << 20) - 10, 11).0, ViewRead::Declined);
        assert_eq!(read(&v, u64::MAX, 1).0, ViewRead::Declined);
        std::fs::remove_file(p).unwrap();
    }

    /// Truncated under the view: the access raises SIGBUS, the guard marks the view faulted,
    /// and this test process lives on.
    #[test]
    fn view_of_a_truncated_file_faults_but_never_kills() {
        let (p, f, data) = file("trunc", 1 << 20);
        let v = ReadView::new(&f, data.len()).unwrap().unwrap();
        assert_eq!(read(&v, 0, 1 << 20).0, ViewRead::Done);
        f.set_len(4096).unwrap();
        let (r, got) = read(&v, 0, 4096);
        assert_eq!(r, ViewRead::Done);
        assert!(got == data[..4096]);
        assert!(!v.faulted());
        let (r, got) = read(&v, 0, 3 * 4096);
        assert_eq!(r, ViewRead::Faulted);
        assert!(got[..4096] == data[..4096]);
        assert!(v.faulted());
        // Retired: even the bytes that are still there are not read through it again.
        assert_eq!(read(&v, 0, 4096).0, ViewRead::Faulted);
        // Another view of another file is unaffected.
        let (p2, f2, data2) = file("other", 8192);
        let w = ReadView::new(&f2, data2.len()).unwrap().unwrap();
        assert_eq!(read(&w, 0, 8192), (ViewRead::Done, data2));
        drop(v);
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(p2).unwrap();
    }
}
