//! A regular file or block device as ciphertext storage. No `unsafe`: the system calls beyond
//! std's (`lseek` with `SEEK_DATA`, `fallocate`, OFD locks, `posix_fadvise`) go through `nix`;
//! the read mapping of a regular file is [`super::view`]'s.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use std::sync::{Arc, PoisonError, RwLock};

use super::view::{ReadView, ViewRead};
use super::{Extent, Storage, StoreLock};

/// A file or block device.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    /// The same file opened `O_DSYNC`: a write through it is durable when it returns, without
    /// an `fdatasync` of the whole file (header updates while the data area is busy). Opened
    /// with `file`, not lazily: the path may later be unlinked or replaced, and header writes
    /// must reach this inode.
    dsync: Option<File>,
    path: PathBuf,
    block_device: bool,
    /// The mapping serving reads decrypt from (regular files only): made on first use,
    /// replaced when the file has grown past it, retired for good after a fault.
    view: RwLock<View>,
}

#[derive(Debug)]
enum View {
    Unopened,
    Open(Arc<ReadView>),
    Off,
}

fn flock(lock: StoreLock, l_type: libc::c_int) -> libc::flock {
    // F_WRLCK, F_UNLCK and SEEK_SET are small constants (1, 2, 0): they fit a short.
    let short = |v: libc::c_int| libc::c_short::try_from(v).unwrap_or_default();
    libc::flock {
        l_type: short(l_type),
        l_whence: short(libc::SEEK_SET),
        l_start: libc::off_t::try_from(lock.byte()).unwrap_or(0),
        l_len: 1,
        // Must be 0 for open-file-description locks.
        l_pid: 0,
    }
}

impl FileStorage {
    /// Opens `path` for reading (and writing unless `read_only`). A regular file that does not
    /// exist is created sparse; a regular file shorter than `min_len` is extended (sparse).
    pub fn open(path: &Path, min_len: u64, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .create(!read_only)
            .truncate(false)
            .open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !read_only && meta.len() < min_len {
            file.set_len(min_len)?;
        }
        let dsync = if read_only {
            None
        } else {
            use std::os::unix::fs::OpenOptionsExt;
            Some(
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DSYNC)
                    .open(path)?,
            )
        };
        // NBDCRYPT_NO_MAPPED_READS=1: read with pread only (a diagnostic switch, and the
        // "before" of the benchmark that measures the mapping).
        let view = if block_device
            || std::env::var_os("NBDCRYPT_NO_MAPPED_READS").is_some_and(|v| v == "1")
        {
            View::Off
        } else {
            View::Unopened
        };
        Ok(FileStorage {
            file,
            dsync,
            path: path.to_owned(),
            block_device,
            view: RwLock::new(view),
        })
    }

    /// Opens an existing file or block device, never creating or extending it.
    pub fn open_existing(path: &Path, read_only: bool) -> io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory, not a file or block device",
            ));
        }
        Self::open(path, 0, read_only)
    }

    /// Whether the store is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file or device in bytes.
    pub fn len(&self) -> io::Result<u64> {
        if self.block_device {
            let mut f = &self.file;
            io::Seek::seek(&mut f, io::SeekFrom::End(0))
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    /// Whether the store has zero length.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The current read mapping, made (or replaced by a longer one) when `need` bytes are not
    /// all inside it; `None` when reads go through `pread`.
    fn view(&self, need: u64) -> Option<Arc<ReadView>> {
        let fits = |v: &ReadView| u64::try_from(v.len()).is_ok_and(|l| l >= need);
        match &*self.view.read().unwrap_or_else(PoisonError::into_inner) {
            View::Open(v) if fits(v) => return Some(Arc::clone(v)),
            View::Off => return None,
            _ => {}
        }
        let mut state = self.view.write().unwrap_or_else(PoisonError::into_inner);
        match &*state {
            View::Open(v) if fits(v) => return Some(Arc::clone(v)),
            View::Off => return None,
            _ => {}
        }
        // Map the whole file as it is now; a read past it (the file is shorter than the
        // volume says) goes through pread, which reads zeroes there.
        let len = self.len().ok().and_then(|l| usize::try_from(l).ok())?;
        if let View::Open(v) = &*state
            && v.len() >= len
        {
            return None;
        }
        match ReadView::new(&self.file, len) {
            Ok(Some(v)) => {
                let v = Arc::new(v);
                *state = View::Open(Arc::clone(&v));
                fits(&v).then_some(v)
            }
            Ok(None) => {
                *state = View::Off;
                None
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "could not map the backing file; reads use pread");
                *state = View::Off;
                None
            }
        }
    }

    /// Retires the read mapping after a fault: every later read goes through `pread`.
    fn retire_view(&self) {
        let mut state = self.view.write().unwrap_or_else(PoisonError::into_inner);
        if !matches!(*state, View::Off) {
            tracing::warn!(path = %self.path.display(),
                "a read of the mapped backing file faulted (an I/O error, or the file was \
                 truncated); this volume's reads use pread from now on");
            *state = View::Off;
        }
    }

    /// `SEEK_DATA`/`SEEK_HOLE` from `offset`; `None` when there is none after it. It moves the
    /// file offset, which no code of ours uses (all I/O is positional).
    fn seek(&self, offset: u64, whence: nix::unistd::Whence) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        match nix::unistd::lseek(&self.file, off, whence) {
            Ok(r) => Ok(u64::try_from(r).ok()),
            // ENXIO: no data (or hole) at or after offset.
            Err(nix::errno::Errno::ENXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl Storage for FileStorage {
    fn size(&self) -> io::Result<u64> {
        self.len()
    }

    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let l =
            libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        nix::fcntl::posix_fadvise(
            &self.file,
            off,
            l,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )?;
        Ok(())
    }

    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.dsync {
            Some(f) => f.write_all_at(buf, offset),
            None => Err(io::Error::from(io::ErrorKind::PermissionDenied)),
        }
    }

    fn lock(&self, lock: StoreLock, wait: bool) -> io::Result<bool> {
        use nix::fcntl::{FcntlArg, fcntl};
        let fl = flock(lock, libc::F_WRLCK);
        loop {
            let arg = if wait {
                FcntlArg::F_OFD_SETLKW(&fl)
            } else {
                FcntlArg::F_OFD_SETLK(&fl)
            };
            match fcntl(&self.file, arg) {
                Ok(_) => return Ok(true),
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) if !wait => {
                    return Ok(false);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn unlock(&self, lock: StoreLock) -> io::Result<()> {
        use nix::fcntl::{FcntlArg, fcntl};
        let fl = flock(lock, libc::F_UNLCK);
        fcntl(&self.file, FcntlArg::F_OFD_SETLK(&fl))?;
        Ok(())
    }

    fn map_range(&self, offset: u64, len: usize) -> io::Result<Option<super::MappedRange>> {
        // Regular files only: a block device's page cache is bypassed by other openers more
        // often than not (O_DIRECT), so reading it through a mapping buys little.
        if self.block_device {
            return Ok(None);
        }
        super::MappedRange::new(&self.file, offset, len)
    }

    fn extend_to(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::ErrorKind::Unsupported.into());
        }
        if self.file.metadata()?.len() < len {
            self.file.set_len(len)?;
            self.file.sync_all()?;
        }
        Ok(())
    }

    fn has_locks(&self) -> bool {
        true
    }

    fn read_in_place(
        &self,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(usize, &[u8]),
    ) -> io::Result<bool> {
        let Some(view) = self.view(offset.saturating_add(len as u64)) else {
            return Ok(false);
        };
        match view.read_with(offset, len, &mut |bytes| f(0, bytes)) {
            ViewRead::Done => Ok(true),
            ViewRead::Declined => Ok(false),
            ViewRead::Faulted => {
                self.retire_view();
                Ok(false)
            }
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    // Past the end of a short file: zeroes, like a hole.
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn serializes_writes(&self) -> bool {
        // Buffered writes to a regular file take its inode lock; a block device's do not.
        !self.block_device
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            // BLKDISCARD does not guarantee zeroes on read; refuse rather than lie.
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let l =
            libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        use nix::fcntl::FallocateFlags;
        match nix::fcntl::fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        ) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => Err(io::Error::from(io::ErrorKind::Unsupported)),
            Err(e) => Err(e.into()),
        }
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len);
        if self.block_device {
            return Ok(vec![Extent { len, hole: false }]);
        }
        let file_len = self.len()?;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            if pos >= file_len {
                out.push(Extent {
                    len: end - pos,
                    hole: true,
                });
                break;
            }
            let data = self
                .seek(pos, nix::unistd::Whence::SeekData)?
                .unwrap_or(file_len);
            if data > pos {
                let stop = data.min(end);
                out.push(Extent {
                    len: stop - pos,
                    hole: true,
                });
                pos = stop;
                continue;
            }
            let hole = self
                .seek(pos, nix::unistd::Whence::SeekHole)?
                .unwrap_or(file_len)
                .max(pos + 1);
            let stop = hole.min(end);
            out.push(Extent {
                len: stop - pos,
                hole: false,
            });
            pos = stop;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("nbdcrypt-storage-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    #[test]
    fn file_storage_reads_back_writes_and_zero_past_end() {
        let p = temp("rw");
        let s = FileStorage::open(&p, 8192, false).unwrap();
        s.write_at(b"hello", 100).unwrap();
        let mut buf = [1u8; 10];
        s.read_at(&mut buf, 98).unwrap();
        assert_eq!(&buf, b"\0\0hello\0\0\0");
        let mut past = [1u8; 16];
        s.read_at(&mut past, 1 << 20).unwrap();
        assert_eq!(past, [0u8; 16]);
        std::fs::remove_file(p).unwrap();
    }

    /// Locks conflict between two opens of one file (even in one process), and go with the
    /// descriptor that held them.
    #[test]
    fn file_storage_locks_exclude_other_opens_and_die_with_the_descriptor() {
        let p = temp("lock");
        let a = FileStorage::open(&p, 8192, false).unwrap();
        let b = FileStorage::open(&p, 0, false).unwrap();
        assert!(a.lock(StoreLock::Serving, false).unwrap());
        assert!(!b.lock(StoreLock::Serving, false).unwrap());
        // Another lock byte is independent.
        assert!(b.lock(StoreLock::Header, false).unwrap());
        b.unlock(StoreLock::Header).unwrap();
        drop(a);
        assert!(b.lock(StoreLock::Serving, false).unwrap());
        b.unlock(StoreLock::Serving).unwrap();
        let c = FileStorage::open(&p, 0, false).unwrap();
        assert!(c.lock(StoreLock::Serving, false).unwrap());
        std::fs::remove_file(p).unwrap();
    }

    /// Reads in place see what `pwrite` wrote (one page cache), follow the file when it grows,
    /// and decline past its end.
    #[test]
    fn file_storage_reads_in_place_what_was_written_and_follows_growth() {
        let p = temp("inplace");
        let s = FileStorage::open(&p, 1 << 20, false).unwrap();
        let read = |offset: u64, len: usize| {
            let mut got = None;
            let done = s
                .read_in_place(offset, len, &mut |at, b| {
                    assert_eq!(at, 0);
                    got = Some(b.to_vec());
                })
                .unwrap();
            done.then(|| got.unwrap())
        };
        s.write_at(&[5u8; 8192], 4096).unwrap();
        assert_eq!(read(4096, 8192), Some(vec![5u8; 8192]));
        s.write_at(&[6u8; 100], 5000).unwrap();
        let got = read(4096, 8192).unwrap();
        assert!(got[904..1004].iter().all(|&b| b == 6) && got[1004] == 5);
        assert_eq!(read((1 << 20) - 4096, 8192), None);
        s.extend_to(2 << 20).unwrap();
        s.write_at(&[7u8; 4096], (2 << 20) - 4096).unwrap();
        assert_eq!(read((2 << 20) - 8192, 8192).unwrap()[4096..], [7u8; 4096]);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn file_storage_durable_write_reads_back() {
        let p = temp("dsync");
        let s = FileStorage::open(&p, 8192, false).unwrap();
        s.write_durable_at(b"header", 4096).unwrap();
        let mut buf = [0u8; 6];
        s.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"header");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn file_storage_punched_hole_reads_zero_and_shows_as_hole() {
        let p = temp("hole");
        let s = FileStorage::open(&p, 1 << 20, false).unwrap();
        s.write_at(&vec![7u8; 1 << 20], 0).unwrap();
        s.punch_hole(256 << 10, 256 << 10).unwrap();
        let mut buf = vec![1u8; 4096];
        s.read_at(&mut buf, 300 << 10).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let ext = s.extents(0, 1 << 20).unwrap();
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 1 << 20);
        assert!(ext.iter().any(|e| e.hole), "{ext:?}");
        assert!(ext.iter().any(|e| !e.hole), "{ext:?}");
        std::fs::remove_file(p).unwrap();
    }
}
