//! The reply side of an upstream connection: one reader thread per connection reads replies
//! in whatever order the server sends them and completes the request each names (a waiting
//! thread, or a submitted read's callback), checking each reply against the protocol.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Mutex, mpsc};

use super::negotiate::MAX_OPTION_REPLY;
use crate::protocol::consts::{SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, chunk};
use crate::protocol::transmission::{CHUNK_HEADER_LEN, SIMPLE_REPLY_LEN};
use crate::protocol::{ChunkHeader, Reader, SimpleReply};
use crate::storage::ReadDone;

/// The outcome of one request: its data (reads) or the server's error value.
pub(super) type Outcome = Result<Vec<u8>, Failed>;

/// Why a request did not succeed.
#[derive(Debug, Clone)]
pub(super) enum Failed {
    /// The server answered with an NBD error value (and maybe a message).
    Errno(u32, String),
    /// The connection is dead.
    Dead(String),
}

/// One request waiting for its reply.
pub(super) struct Waiter {
    /// Volume offset of the request (reads: where `data` starts).
    pub(super) offset: u64,
    /// A read's destination, filled chunk by chunk. It may be a recycled buffer holding an
    /// earlier read's bytes: `filled` proves that the reply replaced every one of them.
    pub(super) data: Vec<u8>,
    /// The parts of `data` that structured-reply chunks filled, in arrival order.
    pub(super) filled: Vec<std::ops::Range<usize>>,
    /// A block status request's descriptors (length, flags), as they came.
    pub(super) status: Vec<u8>,
    /// An error chunk seen before the last one.
    pub(super) error: Option<(u32, String)>,
    /// Taken when the request completes; a submitted read dropped uncompleted (its connection
    /// failed mid-reply) is told `None` by `Drop`.
    pub(super) done: Option<Done>,
    /// When the request was queued: the watchdog drops a connection whose oldest request has
    /// waited longer than the upstream timeout.
    pub(super) since: std::time::Instant,
}

/// Who is told when a request completes.
pub(super) enum Done {
    /// A thread waiting in [`Client::request`].
    Wait(mpsc::SyncSender<Outcome>),
    /// A read submitted with [`Client::submit_read`]: called on the reader thread with the data,
    /// or `None` when the read failed.
    Call(ReadDone),
}

impl Waiter {
    /// A request at `offset` (reads: into `data`) that `done` waits for, from now.
    pub(super) fn new(offset: u64, data: Vec<u8>, done: Done) -> Self {
        Waiter {
            offset,
            data,
            filled: Vec::new(),
            status: Vec::new(),
            error: None,
            done: Some(done),
            since: std::time::Instant::now(),
        }
    }

    /// Tells whoever waits; a submitted read's buffer goes back to `spare` afterwards.
    pub(super) fn complete(mut self, outcome: Outcome, spare: &Spare) {
        match self.done.take() {
            Some(Done::Wait(tx)) => {
                let _ = tx.try_send(outcome);
            }
            Some(Done::Call(f)) => match outcome {
                Ok(mut data) => {
                    f(Some(&mut data));
                    spare.put(data);
                }
                Err(_) => f(None),
            },
            None => {}
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(Done::Call(f)) = self.done.take() {
            f(None);
        }
    }
}

/// Read buffers given back for reuse, so that a read does not allocate and zero a new buffer
/// each time (a 1 MiB read's memset cost 8 % of the server's CPU on the proxy path).
#[derive(Default)]
pub(super) struct Spare(Mutex<Vec<Vec<u8>>>);

impl Spare {
    pub(super) fn put(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > SPARE_MAX_BYTES {
            return;
        }
        let mut spare = lock(&self.0);
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        }
    }

    /// A buffer of `len` bytes: a recycled one (its old contents are overwritten by the
    /// reply, which must cover it) or a new one.
    pub(super) fn take(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut spare = lock(&self.0);
            match spare.iter().position(|b| b.len() == len) {
                Some(i) => Some(spare.swap_remove(i)),
                None => spare.pop(),
            }
        };
        match reused {
            Some(mut b) => {
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }
}

#[derive(Default)]
pub(super) struct Pending {
    pub(super) waiters: HashMap<u64, Waiter>,
    /// Set once the connection has failed (by the reader, or by the watchdog before it shuts
    /// the socket); no new request is accepted.
    pub(super) dead: Option<String>,
}

/// The largest block status chunk accepted: 131,072 descriptors.
const MAX_STATUS_BYTES: usize = 4 + 8 * 131_072;

/// Read buffers kept for reuse per connection, and the largest kept.
const SPARE_BUFFERS: usize = 32;
const SPARE_MAX_BYTES: usize = 4 << 20;

/// Reply headers are read through this much buffer: one `recv` takes several small replies
/// (a 4 KiB read's reply is four pieces), and a large payload bypasses it.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The reader thread: completes waiters until the connection ends, then fails the rest.
/// `context` is the connection's `base:allocation` context id, if any: block status chunks
/// for any other are a protocol violation.
pub(super) fn read_replies(
    sock: Box<dyn Read + Send>,
    pending: &Mutex<Pending>,
    spare: &Spare,
    uri: &str,
    context: Option<u32>,
) {
    let mut sock = std::io::BufReader::with_capacity(READ_BUFFER_BYTES, sock);
    let why = loop {
        match read_one(&mut sock, pending, spare, context) {
            Ok(()) => {}
            Err(e) => break e,
        }
    };
    let (why, waiters) = {
        let mut p = lock(pending);
        // The watchdog's reason, when it is what shut the socket.
        let why = p.dead.get_or_insert(why).clone();
        (why, std::mem::take(&mut p.waiters))
    };
    if !waiters.is_empty() {
        tracing::warn!(
            upstream = uri,
            reason = why,
            failed = waiters.len(),
            "upstream connection lost with requests in flight"
        );
    }
    for (_, w) in waiters {
        w.complete(Err(Failed::Dead(why.clone())), spare);
    }
}

/// Reads one simple reply or one structured chunk; completes its waiter when it is the last.
fn read_one(
    sock: &mut impl Read,
    pending: &Mutex<Pending>,
    spare: &Spare,
    context: Option<u32>,
) -> Result<(), String> {
    let mut head = [0u8; CHUNK_HEADER_LEN];
    sock.read_exact(&mut head[..4])
        .map_err(|e| format!("reading a reply: {e}"))?;
    let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let take = |cookie: u64| -> Result<Waiter, String> {
        lock(pending)
            .waiters
            .remove(&cookie)
            .ok_or_else(|| format!("a reply for unknown cookie {cookie}"))
    };
    match magic {
        SIMPLE_REPLY_MAGIC => {
            sock.read_exact(&mut head[4..SIMPLE_REPLY_LEN])
                .map_err(|e| format!("reading a reply: {e}"))?;
            let r = SimpleReply::decode(&head[..SIMPLE_REPLY_LEN]).map_err(|e| e.to_string())?;
            let mut w = take(r.cookie)?;
            if r.error != 0 {
                w.complete(Err(Failed::Errno(r.error, String::new())), spare);
                return Ok(());
            }
            // A read's data follows (the request said how long); other commands have none.
            sock.read_exact(&mut w.data)
                .map_err(|e| format!("reading read data: {e}"))?;
            let data = std::mem::take(&mut w.data);
            w.complete(Ok(data), spare);
            Ok(())
        }
        STRUCTURED_REPLY_MAGIC => {
            sock.read_exact(&mut head[4..])
                .map_err(|e| format!("reading a reply chunk: {e}"))?;
            let h = ChunkHeader::decode(&head).map_err(|e| e.to_string())?;
            let mut w = take(h.cookie)?;
            match chunk_into(sock, &h, &mut w, context) {
                // A reply that breaks the protocol fails its request with the reason (and then
                // the connection), rather than leaving it to learn only that the reader stopped.
                Err(why) => {
                    w.complete(Err(Failed::Dead(why.clone())), spare);
                    Err(why)
                }
                Ok(Some(outcome)) => {
                    w.complete(outcome, spare);
                    Ok(())
                }
                Ok(None) => {
                    lock(pending).waiters.insert(h.cookie, w);
                    Ok(())
                }
            }
        }
        m => Err(format!("a reply with bad magic {m:#010x}")),
    }
}

/// Reads one chunk into `w`; after the last one, the request's outcome: the server's error,
/// the data of a read (which the chunks must cover exactly), or a block status's descriptors.
fn chunk_into(
    sock: &mut impl Read,
    h: &ChunkHeader,
    w: &mut Waiter,
    context: Option<u32>,
) -> Result<Option<Outcome>, String> {
    read_chunk(sock, h, w, context)?;
    if h.flags & chunk::FLAG_DONE == 0 {
        return Ok(None);
    }
    if let Some((errno, msg)) = w.error.take() {
        return Ok(Some(Err(Failed::Errno(errno, msg))));
    }
    covered(w)?;
    let done = if w.data.is_empty() {
        &mut w.status
    } else {
        &mut w.data
    };
    Ok(Some(Ok(std::mem::take(done))))
}

/// Reads one chunk's payload into its waiter.
fn read_chunk(
    sock: &mut impl Read,
    h: &ChunkHeader,
    w: &mut Waiter,
    context: Option<u32>,
) -> Result<(), String> {
    let len = h.length as usize;
    match h.kind {
        chunk::NONE if len == 0 => Ok(()),
        chunk::BLOCK_STATUS
            if (12..=MAX_STATUS_BYTES).contains(&len)
                && (len - 4).is_multiple_of(8)
                && w.data.is_empty() =>
        {
            let mut p = vec![0u8; len];
            sock.read_exact(&mut p)
                .map_err(|e| format!("reading a block status chunk: {e}"))?;
            let id = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
            if Some(id) != context {
                return Err(format!(
                    "block status for context {id}, which was not negotiated"
                ));
            }
            w.status.extend_from_slice(&p[4..]);
            Ok(())
        }
        chunk::OFFSET_DATA if len >= 8 => {
            let mut off = [0u8; 8];
            sock.read_exact(&mut off)
                .map_err(|e| format!("reading a data chunk: {e}"))?;
            let at = u64::from_be_bytes(off);
            let range = slot(w, at, len - 8)?;
            sock.read_exact(&mut w.data[range.clone()])
                .map_err(|e| format!("reading a data chunk: {e}"))?;
            w.filled.push(range);
            Ok(())
        }
        chunk::OFFSET_HOLE if len == 12 => {
            let mut p = [0u8; 12];
            sock.read_exact(&mut p)
                .map_err(|e| format!("reading a hole chunk: {e}"))?;
            let mut r = Reader::new(&p);
            let (at, n) = (
                r.u64().map_err(|e| e.to_string())?,
                r.u32().map_err(|e| e.to_string())?,
            );
            let range = slot(w, at, n as usize)?;
            w.data[range.clone()].fill(0);
            w.filled.push(range);
            Ok(())
        }
        k if k & (1 << 15) != 0 && (6..=MAX_OPTION_REPLY as usize).contains(&len) => {
            let mut p = vec![0u8; len];
            sock.read_exact(&mut p)
                .map_err(|e| format!("reading an error chunk: {e}"))?;
            let mut r = Reader::new(&p);
            let errno = r.u32().map_err(|e| e.to_string())?;
            let n = r.u16().map_err(|e| e.to_string())?;
            let msg = r
                .take(usize::from(n).min(r.remaining()))
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            // EIO when the server sends 0 in an error chunk (a server bug).
            w.error = Some((if errno == 0 { 5 } else { errno }, msg));
            Ok(())
        }
        k => Err(format!("an unexpected reply chunk: type {k}, {len} bytes")),
    }
}

/// A successful structured read must have been answered by data and hole chunks that cover
/// the whole request, without overlapping (the spec's rule): otherwise the buffer would hand
/// on bytes the reply never sent.
fn covered(w: &mut Waiter) -> Result<(), String> {
    let len = w.data.len();
    if len == 0 {
        return Ok(());
    }
    w.filled.sort_unstable_by_key(|r| r.start);
    let mut end = 0;
    for r in &w.filled {
        if r.start != end {
            return Err(format!(
                "a read reply for {}+{len} {} at byte {end} of the request",
                w.offset,
                if r.start < end {
                    "overlapped itself"
                } else {
                    "left a gap"
                }
            ));
        }
        end = r.end;
    }
    if end != len {
        return Err(format!(
            "a read reply for {}+{len} covered only its first {end} bytes",
            w.offset
        ));
    }
    Ok(())
}

/// Where `n` bytes at volume offset `at` go in the waiter's buffer; a chunk outside the
/// request is a protocol violation.
fn slot(w: &Waiter, at: u64, n: usize) -> Result<std::ops::Range<usize>, String> {
    let start = at
        .checked_sub(w.offset)
        .and_then(|s| usize::try_from(s).ok())
        .filter(|s| s.checked_add(n).is_some_and(|e| e <= w.data.len()))
        .ok_or_else(|| {
            format!(
                "a chunk at {at}+{n} outside its request {}+{}",
                w.offset,
                w.data.len()
            )
        })?;
    Ok(start..start + n)
}

/// Locks `m`, also after a thread panicked holding it (the data stays consistent: every
/// critical section is a plain insert, remove or swap).
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
