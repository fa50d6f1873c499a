//! An NBD client connection: fixed-newstyle negotiation with `OPT_GO` and structured replies,
//! then many requests in flight at once.
//!
//! Any number of threads call [`Client::request`] concurrently. Each request gets a cookie
//! and a waiter; its header (and payload) go out under the socket's write lock; one reader
//! thread reads replies in whatever order the server sends them and completes the waiter
//! whose cookie each names. So a caller blocks only on its own round trip, and the server sees
//! as many requests in flight as there are callers (the crypto workers, the blocking pool).
//! These are plain threads and blocking sockets: no tokio worker ever waits on the upstream.
//!
//! A connection that fails (EOF, a socket error, a reply the client cannot parse) is dead:
//! every waiting and later request fails with an error naming the upstream and the reason.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use super::UpstreamError;
pub use super::negotiate::ExportInfo;
use super::negotiate::{MAX_OPTION_REPLY, NEGOTIATE_TIMEOUT, greet, haggle, start_tls};
use super::sock::Sock;
use super::target::Target;
use crate::protocol::consts::{SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, chunk, cmd};
use crate::protocol::transmission::{CHUNK_HEADER_LEN, SIMPLE_REPLY_LEN};
use crate::protocol::{ChunkHeader, Reader, Request, SimpleReply};

/// The outcome of one request: its data (reads) or the server's error value.
type Outcome = Result<Vec<u8>, Failed>;

/// Why a request did not succeed.
#[derive(Debug, Clone)]
enum Failed {
    /// The server answered with an NBD error value (and maybe a message).
    Errno(u32, String),
    /// The connection is dead.
    Dead(String),
}

/// One request waiting for its reply.
struct Waiter {
    /// Volume offset of the request (reads: where `data` starts).
    offset: u64,
    /// A read's destination, filled chunk by chunk. It may be a recycled buffer holding an
    /// earlier read's bytes: `filled` proves that the reply replaced every one of them.
    data: Vec<u8>,
    /// The parts of `data` that structured-reply chunks filled, in arrival order.
    filled: Vec<std::ops::Range<usize>>,
    /// An error chunk seen before the last one.
    error: Option<(u32, String)>,
    /// Taken when the request completes; a submitted read dropped uncompleted (its connection
    /// failed mid-reply) is told `None` by `Drop`.
    done: Option<Done>,
}

/// Who is told when a request completes.
enum Done {
    /// A thread waiting in [`Client::request`].
    Wait(mpsc::SyncSender<Outcome>),
    /// A read submitted with [`Client::submit_read`]: called on the reader thread with the data,
    /// or `None` when the read failed.
    Call(ReadDone),
}

/// The completion of a submitted read: the bytes, or `None` if the read failed (the caller
/// then reads again the waiting way, which reconnects, retries and reports the error).
pub use crate::storage::ReadDone;

impl Waiter {
    /// Tells whoever waits; a submitted read's buffer goes back to `spare` afterwards.
    fn complete(mut self, outcome: Outcome, spare: &Spare) {
        match self.done.take() {
            Some(Done::Wait(tx)) => {
                let _ = tx.try_send(outcome);
            }
            Some(Done::Call(f)) => match outcome {
                Ok(data) => {
                    f(Some(&data));
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
struct Spare(Mutex<Vec<Vec<u8>>>);

impl Spare {
    fn put(&self, buf: Vec<u8>) {
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
    fn take(&self, len: usize) -> Vec<u8> {
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

/// Request headers of submitted reads, written by the connection's sender thread: a caller on
/// a tokio worker never waits for the socket (a write ahead of it may be a 1 MiB payload, or
/// the upstream may have stopped reading). Headers that pile up go out in one write.
#[derive(Default)]
struct Outbox {
    queue: Mutex<(Vec<u8>, bool)>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Set once the connection has failed; no new request is accepted.
    dead: Option<String>,
}

/// One negotiated connection.
pub struct Client {
    target: String,
    info: ExportInfo,
    structured: bool,
    /// The socket, or the TLS session over it.
    writer: Arc<Mutex<Box<dyn Write + Send>>>,
    /// Shut down on drop, which wakes the reader.
    socket: Sock,
    pending: Arc<Mutex<Pending>>,
    /// Read buffers given back by callers ([`Client::recycle`]) and by submitted reads.
    spare: Arc<Spare>,
    outbox: Arc<Outbox>,
    next_cookie: AtomicU64,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Started by the first [`Client::submit_read`].
    sender: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("target", &self.target)
            .field("info", &self.info)
            .field("structured", &self.structured)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Client {
    /// Connects to `target`, negotiates, and starts the reply reader.
    pub fn connect(target: &Target) -> Result<Client, UpstreamError> {
        let io = |what: &'static str| {
            let uri = target.uri.clone();
            move |source| UpstreamError::Io {
                upstream: uri,
                what,
                source,
            }
        };
        let mut sock = Sock::connect(&target.address).map_err(io("cannot connect"))?;
        sock.set_timeouts(Some(NEGOTIATE_TIMEOUT))
            .map_err(io("cannot set a timeout"))?;
        greet(&mut sock, target)?;
        let socket = sock.try_clone().map_err(io("cannot clone the socket"))?;
        let (info, structured, writer, read_half): (
            _,
            _,
            Box<dyn Write + Send>,
            Box<dyn Read + Send>,
        ) = match &target.tls {
            None => {
                let (info, structured) = haggle(&mut sock, target)?;
                let read_half = sock.try_clone().map_err(io("cannot clone the socket"))?;
                (info, structured, Box::new(sock), Box::new(read_half))
            }
            Some(host) => {
                let mut conn = start_tls(&mut sock, target, host)?;
                // With TLS 1.3 the server checks our certificate after our side of the
                // handshake is done: a refusal shows as the connection closing right after.
                let (info, structured) =
                    haggle(&mut rustls::Stream::new(&mut conn, &mut sock), target).map_err(
                        |e| match e {
                            UpstreamError::Io { source, .. }
                                if matches!(
                                    source.kind(),
                                    std::io::ErrorKind::BrokenPipe
                                        | std::io::ErrorKind::ConnectionReset
                                        | std::io::ErrorKind::UnexpectedEof
                                ) =>
                            {
                                UpstreamError::Tls {
                                    upstream: target.uri.clone(),
                                    why: format!(
                                        "the upstream closed the session right after the handshake ({source}); does it require a client certificate (--upstream-tls-cert, --upstream-tls-key) or refuse ours?"
                                    ),
                                }
                            }
                            other => other,
                        },
                    )?;
                let (w, r) =
                    super::tls::split(conn, sock).map_err(io("cannot clone the socket"))?;
                (info, structured, Box::new(w), Box::new(r))
            }
        };
        socket
            .set_timeouts(None)
            .map_err(io("cannot set a timeout"))?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let spare = Arc::new(Spare::default());
        let reader = {
            let (pending, spare) = (Arc::clone(&pending), Arc::clone(&spare));
            let uri = target.uri.clone();
            std::thread::Builder::new()
                .name("nbdcrypt-upstream".into())
                .spawn(move || read_replies(read_half, &pending, &spare, &uri))
                .map_err(io("cannot start the reply reader"))?
        };
        Ok(Client {
            target: target.uri.clone(),
            info,
            structured,
            writer: Arc::new(Mutex::new(writer)),
            socket,
            pending,
            spare,
            outbox: Arc::new(Outbox::default()),
            next_cookie: AtomicU64::new(1),
            reader: Some(reader),
            sender: Mutex::new(None),
        })
    }

    /// The export as the server described it.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Whether structured replies were negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// Sends one request and waits for its reply; returns a read's data. `payload` is a
    /// write's data (`length` is then its length).
    pub fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<Vec<u8>, UpstreamError> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (done, outcome) = mpsc::sync_channel(1);
        {
            let mut p = lock(&self.pending);
            if let Some(why) = &p.dead {
                return Err(self.dead(why));
            }
            let data = if kind == cmd::READ {
                self.spare.take(length as usize)
            } else {
                Vec::new()
            };
            p.waiters.insert(
                cookie,
                Waiter {
                    offset,
                    data,
                    filled: Vec::new(),
                    error: None,
                    done: Some(Done::Wait(done)),
                },
            );
        }
        let mut header = Vec::with_capacity(28);
        Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode(&mut header);
        let sent = {
            let mut w = lock(&self.writer);
            write_all_vectored(&mut *w, &header, payload.unwrap_or_default())
        };
        if let Err(e) = sent {
            // The reader sees the broken socket too; make sure this waiter does not linger.
            lock(&self.pending).waiters.remove(&cookie);
            return Err(UpstreamError::Io {
                upstream: self.target.clone(),
                what: "cannot send a request",
                source: e,
            });
        }
        match outcome.recv() {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(Failed::Errno(errno, message))) => Err(UpstreamError::Errno {
                upstream: self.target.clone(),
                command: cmd_name(kind),
                offset,
                length,
                errno,
                message,
            }),
            Ok(Err(Failed::Dead(why))) => Err(self.dead(&why)),
            Err(_) => Err(self.dead("the reply reader stopped")),
        }
    }

    /// Gives a read's buffer back for a later read to reuse.
    pub fn recycle(&self, buf: Vec<u8>) {
        self.spare.put(buf);
    }

    /// Sends a read without waiting for it: `done` runs on the reply reader thread with the
    /// data, or with `None` if the read fails or the connection dies first. Hands `done` back
    /// when the connection is already dead. Never blocks on the socket: the header goes out
    /// through the sender thread.
    pub fn submit_read(
        &self,
        flags: u16,
        offset: u64,
        length: u32,
        done: ReadDone,
    ) -> Result<(), ReadDone> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let mut header = Vec::with_capacity(28);
        Request {
            flags,
            kind: cmd::READ,
            cookie,
            offset,
            length,
        }
        .encode(&mut header);
        if !self.sender_running() {
            return Err(done);
        }
        {
            let mut p = lock(&self.pending);
            if p.dead.is_some() {
                return Err(done);
            }
            p.waiters.insert(
                cookie,
                Waiter {
                    offset,
                    data: self.spare.take(length as usize),
                    filled: Vec::new(),
                    error: None,
                    done: Some(Done::Call(done)),
                },
            );
        }
        let mut q = lock(&self.outbox.queue);
        let wake = q.0.is_empty();
        q.0.extend_from_slice(&header);
        drop(q);
        if wake {
            self.outbox.ready.notify_one();
        }
        Ok(())
    }

    /// Starts the sender thread if it is not running yet; false if it cannot be started.
    fn sender_running(&self) -> bool {
        let mut sender = lock(&self.sender);
        if sender.is_some() {
            return true;
        }
        let Ok(socket) = self.socket.try_clone() else {
            return false;
        };
        let (outbox, writer) = (Arc::clone(&self.outbox), Arc::clone(&self.writer));
        match std::thread::Builder::new()
            .name("nbdcrypt-upsend".into())
            .spawn(move || send_queued(&outbox, &writer, &socket))
        {
            Ok(t) => {
                *sender = Some(t);
                true
            }
            Err(_) => false,
        }
    }

    fn dead(&self, why: &str) -> UpstreamError {
        UpstreamError::Lost {
            upstream: self.target.clone(),
            why: why.to_owned(),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        lock(&self.outbox.queue).1 = true;
        self.outbox.ready.notify_one();
        if let Some(t) = lock(&self.sender).take() {
            let _ = t.join();
        }
        let mut disc = Vec::with_capacity(28);
        Request {
            flags: 0,
            kind: cmd::DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode(&mut disc);
        {
            let mut w = lock(&self.writer);
            let _ = w.write_all(&disc);
            // Wakes the reader, which then ends.
            self.socket.shutdown();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// The sender thread: writes queued request headers until the client closes the outbox. A
/// failed write shuts the socket down, so the reader fails every waiting request.
fn send_queued(outbox: &Outbox, writer: &Mutex<Box<dyn Write + Send>>, socket: &Sock) {
    let mut batch = Vec::new();
    loop {
        {
            let mut q = lock(&outbox.queue);
            while q.0.is_empty() && !q.1 {
                q = outbox
                    .ready
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if q.0.is_empty() {
                return;
            }
            std::mem::swap(&mut q.0, &mut batch);
        }
        let sent = {
            let mut w = lock(writer);
            w.write_all(&batch).and_then(|()| w.flush())
        };
        batch.clear();
        if sent.is_err() {
            socket.shutdown();
            return;
        }
    }
}

/// Writes `a` then `b` with as few (vectored) writes as the socket takes.
fn write_all_vectored(w: &mut impl Write, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let mut bufs = [std::io::IoSlice::new(a), std::io::IoSlice::new(b)];
    let mut rest = &mut bufs[..];
    while !rest.is_empty() && rest.iter().any(|s| !s.is_empty()) {
        let n = w.write_vectored(rest)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// The command's name, for errors.
fn cmd_name(kind: u16) -> &'static str {
    match kind {
        cmd::READ => "READ",
        cmd::WRITE => "WRITE",
        cmd::FLUSH => "FLUSH",
        cmd::TRIM => "TRIM",
        cmd::CACHE => "CACHE",
        cmd::WRITE_ZEROES => "WRITE_ZEROES",
        _ => "a command",
    }
}

/// Read buffers kept for reuse per connection, and the largest kept.
const SPARE_BUFFERS: usize = 32;
const SPARE_MAX_BYTES: usize = 4 << 20;

/// The reader thread: completes waiters until the connection ends, then fails the rest.
/// Reply headers are read through this much buffer: one `recv` takes several small replies
/// (a 4 KiB read's reply is four pieces), and a large payload bypasses it.
const READ_BUFFER_BYTES: usize = 64 * 1024;

fn read_replies(sock: Box<dyn Read + Send>, pending: &Mutex<Pending>, spare: &Spare, uri: &str) {
    let mut sock = std::io::BufReader::with_capacity(READ_BUFFER_BYTES, sock);
    let why = loop {
        match read_one(&mut sock, pending, spare) {
            Ok(()) => {}
            Err(e) => break e,
        }
    };
    let waiters = {
        let mut p = lock(pending);
        p.dead = Some(why.clone());
        std::mem::take(&mut p.waiters)
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
fn read_one(sock: &mut impl Read, pending: &Mutex<Pending>, spare: &Spare) -> Result<(), String> {
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
            read_chunk(sock, &h, &mut w)?;
            if h.flags & chunk::FLAG_DONE != 0 {
                let outcome = match w.error.take() {
                    Some((errno, msg)) => Err(Failed::Errno(errno, msg)),
                    None => {
                        if let Err(why) = covered(&mut w) {
                            w.complete(Err(Failed::Dead(why.clone())), spare);
                            return Err(why);
                        }
                        Ok(std::mem::take(&mut w.data))
                    }
                };
                w.complete(outcome, spare);
            } else {
                lock(pending).waiters.insert(h.cookie, w);
            }
            Ok(())
        }
        m => Err(format!("a reply with bad magic {m:#010x}")),
    }
}

/// Reads one chunk's payload into its waiter.
fn read_chunk(sock: &mut impl Read, h: &ChunkHeader, w: &mut Waiter) -> Result<(), String> {
    let len = h.length as usize;
    match h.kind {
        chunk::NONE if len == 0 => Ok(()),
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
