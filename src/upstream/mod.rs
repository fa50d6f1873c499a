//! An upstream NBD export as a volume's backing store: nbdcrypt in front of `qemu-nbd` (Ceph
//! RBD, GlusterFS, iSCSI images), `nbdkit` (S3, HTTP, memory, …) or another NBD server, as
//! dm-crypt sits on an RBD device. Only ciphertext (and the volume header, which holds no key
//! in the clear) ever reaches the upstream.
//!
//! [`NbdStore`] implements [`Storage`] over negotiated [`client::Client`] connections, each kept
//! up by a [`session::Session`] (reconnects, the upstream timeout, flush honesty): the calls
//! are synchronous round trips, made from the blocking pool, or submitted without waiting
//! (reads, whole-sector writes with or without FUA), and many of them are in flight on each
//! connection at once. Where the upstream advertises `CAN_MULTI_CONN` (a flush on one
//! connection covers writes completed on all), requests are spread over
//! [`Options::connections`] connections, round robin; otherwise one connection carries
//! everything. Requests larger than the upstream's maximum payload are split; offsets
//! and lengths must be multiples of its minimum block size (the volume layer only does
//! sector-aligned I/O, and sectors are at least 512 bytes).
//!
//! `nbds://` and `nbds+unix://` add TLS (`NBD_OPT_STARTTLS`, [`tls`]). Block status asks the
//! upstream's `base:allocation` where it has it (`status`), so its holes are ours.

pub mod client;
mod error;
#[cfg(test)]
pub(crate) mod fake;
mod negotiate;
mod replies;
pub mod session;
mod sock;
mod status;
pub mod target;
pub mod tls;
mod watchdog;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

pub use client::{Client, ExportInfo};
pub use error::UpstreamError;
pub use session::{DEFAULT_TIMEOUT, Session};
pub use target::{Address, BadUri, Target, is_uri};

use crate::protocol::consts::{cmd, cmd_flag, err, flag};
use crate::storage::{Extent, ReadDone, Storage, WriteData};

/// How an upstream is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// How long a request waits for a lost upstream (reconnecting meanwhile) before it fails.
    pub timeout: Duration,
    /// Connections to open when the upstream advertises `CAN_MULTI_CONN` (one otherwise).
    pub connections: usize,
}

/// Connections `serve` opens to an upstream that allows several.
pub const DEFAULT_CONNECTIONS: usize = 4;

impl Default for Options {
    /// [`DEFAULT_TIMEOUT`], one connection (what short-lived commands need).
    fn default() -> Self {
        Options {
            timeout: DEFAULT_TIMEOUT,
            connections: 1,
        }
    }
}

/// An upstream export as a store of ciphertext.
#[derive(Debug)]
pub struct NbdStore {
    /// One per connection; never empty.
    sessions: Vec<Session>,
    /// The next connection to use (round robin).
    next: AtomicUsize,
    target: Target,
    /// Whether reads longer than [`DF_ALWAYS`] still ask for an unfragmented reply (until the
    /// upstream refuses one).
    large_df: AtomicBool,
    /// The upstream refused a `BLOCK_STATUS`: it is not asked again (`status`).
    no_status: AtomicBool,
}

/// Reads up to this long always carry `DF` where the upstream offers it: the spec obliges a
/// server to honour it up to here.
const DF_ALWAYS: u32 = 65536;

impl NbdStore {
    /// Connects to the export at `uri` and negotiates, with [`Options::default`].
    pub fn open(uri: &str) -> Result<NbdStore, UpstreamError> {
        Self::open_with(uri, &Options::default())
    }

    /// Connects with `opts`: the first connection tells whether the upstream allows more.
    pub fn open_with(uri: &str, opts: &Options) -> Result<NbdStore, UpstreamError> {
        let target = Target::parse(uri)?;
        let first = Session::connect(target.clone(), opts.timeout)?;
        let multi = first.info().has(flag::CAN_MULTI_CONN);
        let n = if multi { opts.connections.max(1) } else { 1 };
        if opts.connections > 1 && !multi {
            tracing::info!(
                upstream = target.uri,
                "the upstream does not advertise multi-conn: one connection"
            );
        }
        let mut sessions = Vec::with_capacity(n);
        sessions.push(first);
        while sessions.len() < n {
            sessions.push(Session::connect(target.clone(), opts.timeout)?);
        }
        Ok(NbdStore {
            sessions,
            next: AtomicUsize::new(0),
            target,
            large_df: AtomicBool::new(true),
            no_status: AtomicBool::new(false),
        })
    }

    /// The connection for the next request.
    fn client(&self) -> &Session {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sessions.len();
        &self.sessions[i]
    }

    /// Reads ask the upstream not to fragment its reply (`DF`) where it offers that: one data
    /// chunk, and no search for holes on its side. nbdcrypt has no use for the upstream's holes
    /// (it finds all-zero sectors itself), and qemu-nbd answers a fragmentable read by asking
    /// its block driver for allocation status first, which on RBD is another round trip into
    /// the cluster per read (over RBD: 4 KiB random reads 2.4x, 1 MiB sequential reads 1.3x
    /// with `DF`, BENCHMARKING.md). The spec obliges a server to honour `DF` up to 65,536
    /// bytes and lets it refuse a longer unfragmented read with `EOVERFLOW`: the first such
    /// refusal turns `DF` off for reads above 64 KiB ([`read_piece`](Self::read_piece)).
    fn read_flags(&self, len: u32) -> u16 {
        let wanted = len <= DF_ALWAYS || self.large_df.load(Ordering::Relaxed);
        if wanted && self.info().has(flag::SEND_DF) {
            cmd_flag::DF
        } else {
            0
        }
    }

    /// One upstream read of at most [`piece`](Self::piece) bytes, and the connection whose
    /// buffer it is (give it back with [`Session::recycle`]).
    fn read_piece(&self, at: u64, n: u32) -> Result<(Vec<u8>, &Session), UpstreamError> {
        let flags = self.read_flags(n);
        let session = self.client();
        let data = match session.request(cmd::READ, flags, at, n, None) {
            Err(UpstreamError::Errno { errno, .. })
                if errno == err::EOVERFLOW && flags & cmd_flag::DF != 0 && n > DF_ALWAYS =>
            {
                if self.large_df.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        upstream = self.target.uri,
                        length = n,
                        "the upstream refuses unfragmented reads above 64 KiB (EOVERFLOW): longer reads go without DF"
                    );
                }
                session.request(cmd::READ, 0, at, n, None)?
            }
            other => other?,
        };
        Ok((data, session))
    }

    /// Whether `offset..offset+len` lies inside the export.
    fn inside(&self, offset: u64, len: usize) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.info().size)
    }

    /// The length of `offset..offset+len` as one request: inside the export and within the
    /// upstream's block sizes. `None` for anything else (done the waiting way, in pieces).
    fn one_piece(&self, offset: u64, len: usize) -> Option<u32> {
        let fits = len > 0
            && len <= self.piece()
            && self.aligned(offset, len as u64).is_ok()
            && self.inside(offset, len);
        fits.then(|| u32::try_from(len).ok()).flatten()
    }

    /// Connections in use.
    pub fn connections(&self) -> usize {
        self.sessions.len()
    }

    /// The export as the server described it.
    pub fn info(&self) -> ExportInfo {
        self.sessions[0].info()
    }

    /// The upstream's URI.
    pub fn uri(&self) -> &str {
        &self.target.uri
    }

    /// How many times a connection to the upstream was re-established.
    pub fn reconnects(&self) -> u64 {
        self.sessions.iter().map(Session::reconnects).sum()
    }

    fn aligned(&self, offset: u64, length: u64) -> Result<(), UpstreamError> {
        let min = u64::from(self.info().min_block);
        if offset.is_multiple_of(min) && length.is_multiple_of(min) {
            Ok(())
        } else {
            Err(UpstreamError::Unaligned {
                upstream: self.target.uri.clone(),
                offset,
                length,
                min: self.info().min_block,
            })
        }
    }

    /// The largest piece a request is cut into: the upstream's maximum payload, rounded down
    /// to its minimum block size.
    fn piece(&self) -> usize {
        let i = self.info();
        let max = i.max_payload - i.max_payload % i.min_block;
        max.max(i.min_block) as usize
    }

    /// Runs `each(offset, range)` over `offset..offset+len` in pieces of at most
    /// [`piece`](Self::piece) bytes.
    fn pieces(
        &self,
        offset: u64,
        len: usize,
        mut each: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), UpstreamError>,
    ) -> Result<(), UpstreamError> {
        self.aligned(offset, len as u64)?;
        let piece = self.piece();
        let mut at = 0;
        while at < len {
            let n = piece.min(len - at);
            each(offset + at as u64, at..at + n)?;
            at += n;
        }
        Ok(())
    }

    fn write_flags(&self, buf: &[u8], offset: u64, flags: u16) -> Result<(), UpstreamError> {
        self.pieces(offset, buf.len(), |at, r| {
            let n = u32::try_from(r.len()).unwrap_or(u32::MAX);
            self.client()
                .request(cmd::WRITE, flags, at, n, Some(&buf[r]))
                .map(drop)
        })
    }
}

impl Storage for NbdStore {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Past the end reads as zeroes, as a shorter file does.
        let size = self.info().size;
        let inside = usize::try_from(size.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        buf[inside..].fill(0);
        let (head, _) = buf.split_at_mut(inside);
        self.pieces(offset, head.len(), |at, r| {
            let n = u32::try_from(r.len()).unwrap_or(u32::MAX);
            let (data, from) = self.read_piece(at, n)?;
            head[r].copy_from_slice(&data);
            from.recycle(data);
            Ok(())
        })?;
        Ok(())
    }

    fn read_in_place(
        &self,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(usize, &[u8]),
    ) -> io::Result<bool> {
        // The reply buffers are handed to `f` as they arrive, instead of being copied into the
        // caller's buffer first. Only where every piece starts on a 4096-byte boundary and the
        // whole range is inside the export (past the end reads as zeroes: the caller's read).
        if !self.inside(offset, len) || !self.piece().is_multiple_of(4096) {
            return Ok(false);
        }
        self.pieces(offset, len, |at, r| {
            let n = u32::try_from(r.len()).unwrap_or(u32::MAX);
            let (data, from) = self.read_piece(at, n)?;
            f(r.start, &data);
            from.recycle(data);
            Ok(())
        })?;
        Ok(true)
    }

    fn submit_read(&self, offset: u64, len: usize, done: ReadDone) -> Result<(), ReadDone> {
        let Some(n) = self.one_piece(offset, len) else {
            return Err(done);
        };
        self.client()
            .submit_read(self.read_flags(n), offset, n, done)
    }

    fn submit_write(
        &self,
        offset: u64,
        data: WriteData,
        fua: bool,
        done: ReadDone,
    ) -> Result<(), ReadDone> {
        let flags = if fua { cmd_flag::FUA } else { 0 };
        if self.one_piece(offset, data.len()).is_none() || (fua && !self.info().has(flag::SEND_FUA))
        {
            return Err(done);
        }
        self.client().submit_write(flags, offset, data, done)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        Ok(self.write_flags(buf, offset, 0)?)
    }

    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.info().has(flag::SEND_FUA) {
            Ok(self.write_flags(buf, offset, cmd_flag::FUA)?)
        } else {
            self.write_at(buf, offset)?;
            self.sync()
        }
    }

    /// A FLUSH on every connection, at once. Multi-conn would let one cover all, but each
    /// connection's flush honesty (a reconnect after unflushed writes) is its own to report.
    fn sync(&self) -> io::Result<()> {
        if !self.info().has(flag::SEND_FLUSH) {
            return Ok(());
        }
        let flush = |s: &Session| s.request(cmd::FLUSH, 0, 0, 0, None).map(drop);
        if let [only] = self.sessions.as_slice() {
            return Ok(flush(only)?);
        }
        let results: Vec<Result<(), UpstreamError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self.sessions[1..]
                .iter()
                .map(|s| scope.spawn(move || flush(s)))
                .collect();
            let mut out = vec![flush(&self.sessions[0])];
            out.extend(handles.into_iter().map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(UpstreamError::Lost {
                        upstream: self.target.uri.clone(),
                        why: "a flush thread panicked".into(),
                    })
                })
            }));
            out
        });
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// The range must read back as zeroes: `WRITE_ZEROES` (which may deallocate) where the
    /// upstream has it, else zero bytes written.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.aligned(offset, len)?;
        if self.info().has(flag::SEND_WRITE_ZEROES) {
            let piece = self.piece() as u64;
            let mut at = 0;
            while at < len {
                let n = piece.min(len - at);
                let n32 = u32::try_from(n).unwrap_or(u32::MAX);
                self.client()
                    .request(cmd::WRITE_ZEROES, 0, offset + at, n32, None)?;
                at += n;
            }
            return Ok(());
        }
        let zeroes = vec![0u8; self.piece().min(usize::try_from(len).unwrap_or(usize::MAX))];
        let mut at = 0;
        while at < len {
            let n = usize::try_from(len - at).map_or(zeroes.len(), |rest| rest.min(zeroes.len()));
            self.write_at(&zeroes[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// The upstream's `base:allocation` where it has it, else all data (`status`).
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.allocation(offset, len)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.info().size)
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.info().has(flag::SEND_CACHE) || self.aligned(offset, len).is_err() {
            return Ok(());
        }
        let n = u32::try_from(len.min(self.piece() as u64)).unwrap_or(u32::MAX);
        self.client().request(cmd::CACHE, 0, offset, n, None)?;
        Ok(())
    }
}
