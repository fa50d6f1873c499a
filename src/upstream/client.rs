//! An NBD client connection: fixed-newstyle negotiation with `OPT_GO` and structured replies,
//! then many requests in flight at once.
//!
//! Any number of threads call [`Client::request`] concurrently. Each request gets a cookie
//! and a waiter; its header (and payload) go out under the socket's write lock; one reader
//! thread reads replies in whatever order the server sends them and completes the waiter
//! whose cookie each names. So a caller blocks only on its own round trip, and the server sees
//! as many requests in flight as there are callers (the crypto workers, the blocking pool).
//! These are plain threads and blocking sockets: no tokio worker ever waits on the upstream.
//! Reads and writes can also be submitted without waiting ([`Client::submit_read`],
//! [`Client::submit_write`]): their headers (and a write's payload, uncopied) go out through
//! the connection's sender thread and the reader thread runs their completion (`replies`).
//!
//! A connection that fails (EOF, a socket error, a reply the client cannot parse) is dead:
//! every waiting and later request fails with an error naming the upstream and the reason.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use super::UpstreamError;
pub use super::negotiate::ExportInfo;
use super::negotiate::{NEGOTIATE_TIMEOUT, greet, haggle, start_tls};
use super::replies::{Done, Failed, Pending, Spare, Waiter, lock, read_replies};
use super::sock::Sock;
use super::target::Target;
use super::watchdog::Watchdog;
use crate::protocol::Request;
use crate::protocol::consts::cmd;
use crate::storage::{ReadDone, WriteData};

/// Submitted requests (reads, and writes with their payload), written by the connection's
/// sender thread: a caller on a tokio worker never waits for the socket (a write ahead of it
/// may be a 1 MiB payload, or the upstream may have stopped reading). Requests that pile up go
/// out in one vectored write.
#[derive(Default)]
struct Outbox {
    queue: Mutex<Queued>,
    ready: std::sync::Condvar,
}

/// What the sender thread has still to write.
#[derive(Default)]
struct Queued {
    /// Request headers, back to back.
    headers: Vec<u8>,
    /// Write payloads and where each goes: after the first `.0` bytes of `headers`.
    payloads: Vec<(usize, WriteData)>,
    /// The client is closing: the sender ends.
    closed: bool,
}

impl Queued {
    fn is_empty(&self) -> bool {
        self.headers.is_empty()
    }
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
    /// Drops the connection when the upstream stops answering; stops with the client.
    _watchdog: Watchdog,
    /// Writes the headers queued in `outbox`.
    sender: Option<std::thread::JoinHandle<()>>,
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

impl Client {
    /// Connects to `target`, negotiates, and starts the reply reader. `limit` bounds the
    /// negotiation and how long a request may go unanswered before the connection is dropped
    /// (the upstream timeout).
    pub fn connect(target: &Target, limit: Duration) -> Result<Client, UpstreamError> {
        let io = |what: &'static str| {
            let uri = target.uri.clone();
            move |source| UpstreamError::Io {
                upstream: uri,
                what,
                source,
            }
        };
        let mut sock = Sock::connect(&target.address).map_err(io("cannot connect"))?;
        sock.set_timeouts(Some(NEGOTIATE_TIMEOUT.min(limit)))
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
            let (uri, context) = (target.uri.clone(), info.allocation);
            std::thread::Builder::new()
                .name("nbdcrypt-upstream".into())
                .spawn(move || read_replies(read_half, &pending, &spare, &uri, context))
                .map_err(io("cannot start the reply reader"))?
        };
        let writer = Arc::new(Mutex::new(writer));
        let outbox = Arc::new(Outbox::default());
        let sender = {
            let (outbox, writer) = (Arc::clone(&outbox), Arc::clone(&writer));
            let socket = socket.try_clone().map_err(io("cannot clone the socket"))?;
            std::thread::Builder::new()
                .name("nbdcrypt-upsend".into())
                .spawn(move || send_queued(&outbox, &writer, &socket))
                .map_err(io("cannot start the request sender"))?
        };
        let watchdog = Watchdog::start(
            limit,
            Arc::clone(&pending),
            socket.try_clone().map_err(io("cannot clone the socket"))?,
        )
        .map_err(io("cannot start the watchdog"))?;
        Ok(Client {
            target: target.uri.clone(),
            info,
            structured,
            writer,
            socket,
            pending,
            spare,
            outbox,
            next_cookie: AtomicU64::new(1),
            reader: Some(reader),
            _watchdog: watchdog,
            sender: Some(sender),
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
            p.waiters
                .insert(cookie, self.waiter(kind, offset, length, Done::Wait(done)));
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
            let mut slices = [
                std::io::IoSlice::new(&header),
                std::io::IoSlice::new(payload.unwrap_or_default()),
            ];
            write_all_vectored(&mut *w, &mut slices)
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

    /// The waiter of a request: a read's gets a (recycled) buffer of its length.
    fn waiter(&self, kind: u16, offset: u64, length: u32, done: Done) -> Waiter {
        let data = if kind == cmd::READ {
            self.spare.take(length as usize)
        } else {
            Vec::new()
        };
        Waiter::new(offset, data, done)
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
        self.submit(cmd::READ, flags, offset, length, None, done)
    }

    /// Sends a write without waiting for it: `data` goes out from the sender thread (no copy),
    /// and `done` runs on the reply reader thread with `Some` once the server acknowledged the
    /// write, or `None` if it failed or the connection died first. Hands `done` back when the
    /// connection is already dead.
    pub fn submit_write(
        &self,
        flags: u16,
        offset: u64,
        data: WriteData,
        done: ReadDone,
    ) -> Result<(), ReadDone> {
        let Ok(length) = u32::try_from((*data).len()) else {
            return Err(done);
        };
        self.submit(cmd::WRITE, flags, offset, length, Some(data), done)
    }

    /// Registers a submitted request's completion (a read's with a buffer for its data) and
    /// queues the request, with a write's payload, for the sender thread.
    fn submit(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<WriteData>,
        done: ReadDone,
    ) -> Result<(), ReadDone> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        {
            let mut p = lock(&self.pending);
            if p.dead.is_some() {
                return Err(done);
            }
            p.waiters
                .insert(cookie, self.waiter(kind, offset, length, Done::Call(done)));
        }
        let mut q = lock(&self.outbox.queue);
        let wake = q.is_empty();
        Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode(&mut q.headers);
        if let Some(data) = payload {
            let at = q.headers.len();
            q.payloads.push((at, data));
        }
        drop(q);
        if wake {
            self.outbox.ready.notify_one();
        }
        Ok(())
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
        lock(&self.outbox.queue).closed = true;
        self.outbox.ready.notify_one();
        if let Some(t) = self.sender.take() {
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
            // The last owner of a volume can be a submitted read's completion, which runs on
            // the reader thread: dropping the store there drops this client there. The
            // reader ends by itself once the socket is shut; it cannot wait for itself.
            if r.thread().id() != std::thread::current().id() {
                let _ = r.join();
            }
        }
    }
}

/// The sender thread: writes queued requests until the client closes the outbox. A failed
/// write shuts the socket down, so the reader fails every waiting request.
fn send_queued(outbox: &Outbox, writer: &Mutex<Box<dyn Write + Send>>, socket: &Sock) {
    let mut batch = Queued::default();
    loop {
        {
            let mut q = lock(&outbox.queue);
            while q.is_empty() && !q.closed {
                q = outbox
                    .ready
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if q.is_empty() {
                return;
            }
            std::mem::swap(&mut q.headers, &mut batch.headers);
            std::mem::swap(&mut q.payloads, &mut batch.payloads);
        }
        let sent = {
            let mut slices = Vec::with_capacity(batch.payloads.len() * 2 + 1);
            let mut from = 0;
            for (at, data) in &batch.payloads {
                slices.push(std::io::IoSlice::new(&batch.headers[from..*at]));
                slices.push(std::io::IoSlice::new(data));
                from = *at;
            }
            slices.push(std::io::IoSlice::new(&batch.headers[from..]));
            let mut w = lock(writer);
            write_all_vectored(&mut *w, &mut slices).and_then(|()| w.flush())
        };
        batch.headers.clear();
        // The payloads' buffers go back to their owners (or wait for a resend).
        batch.payloads.clear();
        if sent.is_err() {
            socket.shutdown();
            return;
        }
    }
}

/// Writes every slice, in order, with as few (vectored) writes as the socket takes.
fn write_all_vectored(
    w: &mut impl Write,
    mut rest: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    while rest.iter().any(|s| !s.is_empty()) {
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
