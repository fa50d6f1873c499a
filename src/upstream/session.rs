//! A connection to the upstream that survives the upstream going away for a while.
//!
//! Requests go out on the current [`Client`]. When that connection fails, the first request to
//! notice reconnects (0.1 s doubling to 2 s between attempts, each logged with the upstream and
//! the reason), and every request that failed with it is sent again on the new connection (a
//! read, write, zeroing or flush may be repeated: each does the same again). A request that
//! cannot complete within the upstream timeout (`serve --upstream-timeout`, default 30 s)
//! fails, and so the client gets EIO instead of waiting forever; the export serves again as
//! soon as the upstream is back. An upstream that keeps its connection open but stops
//! answering counts as lost once a request has waited the upstream timeout (the connection's
//! watchdog drops it).
//!
//! Durability: a FLUSH is acknowledged only when the upstream acknowledged it. Writes the old
//! connection acknowledged but no flush covered may have died with the upstream (a restarted
//! server loses its cache), and a flush on the new connection cannot vouch for them: the next
//! FLUSH after such a reconnect fails with EIO once (as `fsync` reports a lost write-back
//! once), instead of claiming durability for data that may be gone. Replaying those writes
//! would need a journal of unflushed data; not done.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::UpstreamError;
use super::client::{Client, ExportInfo};
use super::target::Target;
use crate::protocol::consts::cmd;

/// The default of `serve --upstream-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The first and the longest wait between reconnection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// The upstream connection, replaced when it fails.
#[derive(Debug)]
pub struct Session {
    target: Target,
    timeout: Duration,
    info: ExportInfo,
    /// The connection in use and its generation (how many connections came before it).
    current: RwLock<(u64, Arc<Client>)>,
    /// Held while reconnecting, so that one request reconnects and the others wait for it.
    reconnecting: Mutex<()>,
    /// Writes (and zeroings) acknowledged, counted (also by submitted writes' completions).
    written: Arc<AtomicU64>,
    /// The value of `written` that the last acknowledged FLUSH covered.
    flushed: AtomicU64,
    /// A connection died after acknowledging writes that no flush covered.
    unflushed_lost: AtomicBool,
}

impl Session {
    /// Connects and negotiates; requests then wait up to `timeout` for a lost upstream.
    pub fn connect(target: Target, timeout: Duration) -> Result<Session, UpstreamError> {
        let client = Client::connect(&target, timeout)?;
        Ok(Session {
            info: client.info(),
            target,
            timeout,
            current: RwLock::new((0, Arc::new(client))),
            reconnecting: Mutex::new(()),
            written: Arc::new(AtomicU64::new(0)),
            flushed: AtomicU64::new(0),
            unflushed_lost: AtomicBool::new(false),
        })
    }

    /// The export as the server described it when we first connected.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// The upstream.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// How many times the connection was replaced.
    pub fn reconnects(&self) -> u64 {
        self.current().0
    }

    fn current(&self) -> (u64, Arc<Client>) {
        let c = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (c.0, Arc::clone(&c.1))
    }

    /// [`Client::submit_read`] on the current connection: no retry here; a failed read tells
    /// `done` `None`, and the caller reads again with [`request`](Self::request), which
    /// reconnects and retries.
    pub fn submit_read(
        &self,
        flags: u16,
        offset: u64,
        length: u32,
        done: crate::storage::ReadDone,
    ) -> Result<(), crate::storage::ReadDone> {
        self.current().1.submit_read(flags, offset, length, done)
    }

    /// [`Client::submit_write`] on the current connection: an acknowledged write counts for
    /// flush honesty as one sent with [`request`](Self::request) does. No retry here either: a
    /// failed write tells `done` `None`, and the caller writes again with `request`.
    pub fn submit_write(
        &self,
        flags: u16,
        offset: u64,
        data: crate::storage::WriteData,
        done: crate::storage::ReadDone,
    ) -> Result<(), crate::storage::ReadDone> {
        let written = Arc::clone(&self.written);
        let counted: crate::storage::ReadDone = Box::new(move |acked| {
            if acked.is_some() {
                written.fetch_add(1, Ordering::SeqCst);
            }
            done(acked);
        });
        self.current().1.submit_write(flags, offset, data, counted)
    }

    /// Gives a read's buffer back for reuse ([`Client::recycle`]).
    pub fn recycle(&self, buf: Vec<u8>) {
        self.current().1.recycle(buf);
    }

    /// [`Client::request`], sent again on a new connection when the connection fails, for at
    /// most the upstream timeout.
    pub fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<Vec<u8>, UpstreamError> {
        let deadline = Instant::now() + self.timeout;
        // A request that fails again on a new connection waits before the next one.
        let (mut retried, mut pause) = (false, BACKOFF.0);
        loop {
            let (generation, client) = self.current();
            if kind == cmd::FLUSH && self.unflushed_lost.swap(false, Ordering::SeqCst) {
                return Err(UpstreamError::Unflushed {
                    upstream: self.target.uri.clone(),
                });
            }
            let covered = self.written.load(Ordering::SeqCst);
            match client.request(kind, flags, offset, length, payload) {
                Ok(data) => {
                    match kind {
                        cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM => {
                            self.written.fetch_add(1, Ordering::SeqCst);
                        }
                        cmd::FLUSH => {
                            self.flushed.fetch_max(covered, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                    return Ok(data);
                }
                Err(e) if e.connection_failed() => {
                    drop(client);
                    let now = Instant::now();
                    if now >= deadline {
                        // Connections come up but the request keeps failing on them (a server
                        // that breaks the protocol the same way each time): give up as when the
                        // upstream stays away, instead of reconnecting forever. Failing the
                        // first time past the deadline: the upstream did not answer in time
                        // (the watchdog dropped the connection).
                        crate::metrics::global().upstream_gave_up(&self.target.uri);
                        let (upstream, seconds, last) = (
                            self.target.uri.clone(),
                            self.timeout.as_secs_f64(),
                            Box::new(e),
                        );
                        return Err(if retried {
                            tracing::error!(upstream, reason = %last, "upstream requests keep failing: failing the request (EIO)");
                            UpstreamError::Failing {
                                upstream,
                                seconds,
                                last,
                            }
                        } else {
                            tracing::error!(upstream, reason = %last, "upstream did not answer in time: failing the request (EIO)");
                            UpstreamError::GaveUp {
                                upstream,
                                seconds,
                                last,
                            }
                        });
                    }
                    if retried {
                        std::thread::sleep(pause.min(deadline - now));
                        pause = (pause * 2).min(BACKOFF.1);
                    }
                    retried = true;
                    self.reconnect(generation, deadline, &e)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Replaces connection `failed` (unless another request already did), trying until
    /// `deadline`.
    fn reconnect(
        &self,
        failed: u64,
        deadline: Instant,
        why: &UpstreamError,
    ) -> Result<(), UpstreamError> {
        let _one = self
            .reconnecting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.current().0 != failed {
            return Ok(());
        }
        tracing::warn!(upstream = self.target.uri, reason = %why, "upstream connection failed; reconnecting");
        let started = Instant::now();
        let mut wait = BACKOFF.0;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match Client::connect(&self.target, self.timeout) {
                Ok(client) if client.info().size != self.info.size => {
                    return Err(UpstreamError::Protocol {
                        upstream: self.target.uri.clone(),
                        what: format!(
                            "the export came back with {} bytes instead of {}",
                            client.info().size,
                            self.info.size
                        ),
                    });
                }
                Ok(client) => {
                    if self.written.load(Ordering::SeqCst) > self.flushed.load(Ordering::SeqCst) {
                        self.unflushed_lost.store(true, Ordering::SeqCst);
                    }
                    let mut c = self
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    *c = (failed + 1, Arc::new(client));
                    crate::metrics::global().upstream_reconnected(&self.target.uri);
                    tracing::info!(
                        upstream = self.target.uri,
                        attempts = attempt,
                        after_s = started.elapsed().as_secs_f64(),
                        "upstream connection re-established"
                    );
                    return Ok(());
                }
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        tracing::error!(upstream = self.target.uri, attempts = attempt, reason = %e, "upstream still unreachable: failing the request (EIO)");
                        crate::metrics::global().upstream_gave_up(&self.target.uri);
                        return Err(UpstreamError::GaveUp {
                            upstream: self.target.uri.clone(),
                            seconds: self.timeout.as_secs_f64(),
                            last: Box::new(e),
                        });
                    }
                    tracing::warn!(upstream = self.target.uri, attempt, reason = %e, "upstream reconnect failed; retrying");
                    std::thread::sleep(wait.min(deadline - now));
                    wait = (wait * 2).min(BACKOFF.1);
                }
            }
        }
    }
}
