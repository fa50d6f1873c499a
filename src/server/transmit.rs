//! The transmission phase of one connection: pipelined requests, replies by cookie. This
//! module reads, validates, admits (permits) and writes; running a request is
//! [`super::execute`]'s, and where it runs is [`super::pipeline::placement`]'s.
//!
//! One task reads request headers (and write payloads) in order, through a read buffer so that
//! a burst of small requests costs one `recv`. Each validated request then runs where it is
//! cheapest (see [`Placement`]):
//! - small reads and writes (below the workers' split threshold) **inline**, on this task: a
//!   4 KiB request is done in about a microsecond, less than a hand-off to another thread;
//! - large reads and writes on the **crypto workers**, split into sector runs in parallel,
//!   while this task goes on reading the next requests;
//! - `FLUSH`, FUA writes, `TRIM` and `WRITE_ZEROES` on tokio's **blocking pool**, because they
//!   may wait for the disk and must not hold up either of the others.
//!
//! Replies go through a channel to the one task that owns the socket's write half; it sends
//! every ready reply, header and data, in one vectored write. Replies leave in completion
//! order, matched to requests by cookie, as the spec allows.
//!
//! Data path: a read decrypts in place in the buffer `pread` filled, which is the buffer the
//! reply is sent from; a write is received into a buffer, encrypted in place and written from
//! it. Buffers come from the server's [`BufferPool`] and go back after the reply has left.
//!
//! Bounds: at most [`MAX_IN_FLIGHT`] requests and [`MAX_BUFFERED_BYTES`] of payload per
//! connection, and the server-wide payload budget of the [`BufferPool`]; the reader waits for
//! permits before it reads the next payload, so a client that pipelines faster than the volume
//! serves is slowed down, not buffered without limit.

use std::io::IoSlice;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc, watch};

use super::execute::dispatch;
use super::negotiate::Session;
use super::pipeline::{Permits, Placement, Reply, Resources, Work, error_reply};
use super::validate::{Command, Limits, Verdict, validate};
use crate::protocol::Request;
use crate::protocol::consts::err;
use crate::protocol::transmission::REQUEST_LEN;

/// Requests in flight per connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// Payload bytes in flight per connection (reads being served plus writes being applied).
/// At least one maximum-size request (32 MiB) must fit.
pub const MAX_BUFFERED_BYTES: usize = 96 * 1024 * 1024;
/// The request read buffer: bursts of small requests are read with one `recv`.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Most replies sent in one vectored write.
const MAX_BATCH: usize = 64;

/// How many requests of a connection ran where (logged when it closes).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Inline on the connection's task.
    pub inline: u64,
    /// On the crypto workers.
    pub workers: u64,
    /// On tokio's blocking pool.
    pub blocking: u64,
    /// Submitted to a remote store without waiting.
    pub submitted: u64,
}

/// Why a connection ended.
#[derive(Debug)]
pub enum End {
    /// `DISC`, or the client closed between requests.
    Clean,
    /// The server is shutting down.
    Shutdown,
    /// The export was withdrawn (its volume was deleted).
    Retired,
    /// The client broke the protocol or the socket failed.
    Error(String),
}

/// Sends a batch of replies with as few vectored writes as the socket allows.
async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, batch: &[Reply]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for r in batch {
        slices.push(IoSlice::new(&r.header));
        if let Some(d) = &r.data
            && !d.is_empty()
        {
            slices.push(IoSlice::new(d));
        }
    }
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Reply>,
) -> std::io::Result<()> {
    let mut batch: Vec<Reply> = Vec::with_capacity(MAX_BATCH);
    while let Some(r) = rx.recv().await {
        batch.push(r);
        // Everything already waiting goes out in the same write.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        write_batch(&mut w, &batch).await?;
        for r in &batch {
            if let Some(mark) = r.permits.as_ref().and_then(|p| p.mark.as_ref()) {
                mark.finish(r.errno);
            }
        }
        // Dropping the replies returns their buffers and releases their permits.
        batch.clear();
    }
    w.flush().await?;
    w.shutdown().await
}

/// Serves requests until `DISC`, EOF, a protocol error or shutdown; waits for in-flight
/// requests before returning.
pub async fn serve<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    session: Session,
    resources: Resources,
    mut shutdown: watch::Receiver<bool>,
) -> (End, Stats) {
    let mut stats = Stats::default();
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT * 2);
    let writer_task = tokio::spawn(writer(wr, rx));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // A connection may always hold at least one largest request.
    let conn_bytes = Arc::new(Semaphore::new(
        MAX_BUFFERED_BYTES.max(session.export.max_request as usize),
    ));
    let volume = Arc::clone(&session.export.volume);
    let structured = session.structured;
    let cfg = volume.config().clone();
    let mut retired = session.export.retired.subscribe();
    let metrics = session.export.metrics.clone();
    let limits = Limits {
        size: volume.size(),
        read_only: cfg.read_only,
        structured,
        trim: cfg.discards && !cfg.read_only,
        block_status: session.block_status,
        max_payload: session.export.max_request,
    };

    let end = loop {
        let mut hdr = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            r = rd.read_exact(&mut hdr) => r,
            _ = shutdown.changed() => break End::Shutdown,
            _ = retired.wait_for(|r| *r) => break End::Retired,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break End::Clean,
            Err(e) => break End::Error(format!("reading a request: {e}")),
        }
        let req = match Request::decode(&hdr) {
            Ok(r) => r,
            Err(e) => break End::Error(format!("bad request header: {e}")),
        };
        let cmd = match validate(&req, &limits) {
            Verdict::Disconnect(why) => break End::Error(why.to_owned()),
            Verdict::Fail { errno, payload } => {
                if payload > 0 {
                    let mut skip = (&mut rd).take(u64::from(payload));
                    if let Err(e) = tokio::io::copy(&mut skip, &mut tokio::io::sink()).await {
                        break End::Error(format!("skipping a refused payload: {e}"));
                    }
                }
                let msg = match errno {
                    err::EINVAL => "invalid request",
                    err::ENOSPC => "write past the end of the export",
                    err::EPERM => "export is read-only",
                    err::EOVERFLOW => "request longer than the maximum block size",
                    _ => "request refused",
                };
                tracing::debug!(
                    cookie = req.cookie,
                    command = req.kind,
                    offset = req.offset,
                    length = req.length,
                    errno,
                    reason = msg,
                    "request refused"
                );
                if let Some(m) = &metrics {
                    m.refused(req.kind, errno);
                }
                if tx
                    .send(error_reply(structured, req.cookie, errno, msg))
                    .await
                    .is_err()
                {
                    break End::Error("reply writer stopped".into());
                }
                continue;
            }
            Verdict::Run(Command::Disc) => break End::Clean,
            Verdict::Run(cmd) => cmd,
        };
        // Other requests of this connection still in flight: the client is pipelining.
        let pipelined = in_flight.available_permits() < MAX_IN_FLIGHT;
        let Ok(slot) = Arc::clone(&in_flight).acquire_owned().await else {
            break End::Error("in-flight limiter closed".into());
        };
        let payload_len = match cmd {
            Command::Read { len, .. } | Command::Write { len, .. } => len,
            _ => 0,
        };
        let (conn_permit, server_permit) = if payload_len > 0 {
            let Ok(c) = Arc::clone(&conn_bytes)
                .acquire_many_owned(payload_len)
                .await
            else {
                break End::Error("buffer limiter closed".into());
            };
            let budget = Arc::clone(resources.buffers.budget());
            // A request larger than the whole server budget would wait forever: it takes all.
            let want = payload_len
                .min(u32::try_from(resources.buffers.budget_bytes()).unwrap_or(u32::MAX));
            let Ok(s) = budget.acquire_many_owned(want).await else {
                break End::Error("server buffer limiter closed".into());
            };
            (Some(c), Some(s))
        } else {
            (None, None)
        };
        let permits = Permits {
            slot,
            conn_bytes: conn_permit,
            server_bytes: server_permit,
            mark: metrics.as_ref().map(|m| m.admit(req.kind, payload_len)),
        };
        let payload = if let Command::Write { len, .. } = cmd {
            let mut data = resources.buffers.take(len as usize);
            if let Err(e) = rd.read_exact(&mut data).await {
                break End::Error(format!("reading a write payload: {e}"));
            }
            Some(data)
        } else {
            None
        };
        let work = Work {
            structured,
            cookie: req.cookie,
            cmd,
            payload,
            split: false,
        };
        match dispatch(&volume, &resources, work, permits, pipelined, &tx).await {
            Ok(Placement::Inline) => stats.inline += 1,
            Ok(Placement::Workers) => stats.workers += 1,
            Ok(Placement::Blocking) => stats.blocking += 1,
            Ok(Placement::Submitted) => stats.submitted += 1,
            Err(_) => break End::Error("reply writer stopped".into()),
        }
    };
    // Wait for every in-flight request to be answered: a slot comes back only when its reply
    // has been written (or dropped because the writer stopped).
    drop(tx);
    let _all = in_flight
        .acquire_many(u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX))
        .await;
    match writer_task.await {
        Ok(Ok(())) | Ok(Err(_)) => {}
        Err(e) => tracing::warn!(error = %e, "reply writer panicked"),
    }
    (end, stats)
}
