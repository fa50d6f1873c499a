//! The transmission phase of one connection: pipelined requests, replies by cookie.
//!
//! One task reads request headers (and write payloads) in order; each validated request runs
//! on the blocking pool, concurrently with the others; its reply goes through a channel to the
//! single task that owns the socket's write half. Replies therefore leave in completion order,
//! matched to requests by cookie, as the spec allows.
//!
//! Bounds: at most [`MAX_IN_FLIGHT`] requests, and at most [`MAX_BUFFERED_BYTES`] of read and
//! write payloads, are in flight per connection; the reader waits for permits before reading the
//! next payload, so a client that pipelines faster than the volume serves is slowed down, not
//! buffered without limit.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, watch};

use super::negotiate::{ALLOCATION_CONTEXT_ID, Session};
use super::validate::{Command, Limits, Verdict, validate};
use crate::protocol::Request;
use crate::protocol::consts::err;
use crate::protocol::transmission::{self, REQUEST_LEN};
use crate::volume::EncryptedVolume;

/// Requests in flight per connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// Payload bytes in flight per connection (reads being served plus writes being applied).
pub const MAX_BUFFERED_BYTES: usize = 96 * 1024 * 1024;

/// One reply: header bytes and optional data that follows them.
struct Reply {
    header: Vec<u8>,
    data: Option<Vec<u8>>,
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

fn error_reply(structured: bool, cookie: u64, errno: u32, msg: &str) -> Reply {
    let mut header = Vec::new();
    if structured {
        transmission::error_chunk(&mut header, cookie, errno, msg);
    } else {
        transmission::SimpleReply {
            error: errno,
            cookie,
        }
        .encode(&mut header);
    }
    Reply { header, data: None }
}

fn ok_reply(structured: bool, cookie: u64) -> Reply {
    let mut header = Vec::new();
    if structured {
        transmission::none_chunk(&mut header, cookie);
    } else {
        transmission::SimpleReply { error: 0, cookie }.encode(&mut header);
    }
    Reply { header, data: None }
}

/// Executes a validated command on the volume (blocking) and builds its reply.
fn execute(
    volume: &EncryptedVolume,
    structured: bool,
    cookie: u64,
    cmd: Command,
    payload: Option<Vec<u8>>,
) -> Reply {
    let result = match cmd {
        Command::Read { offset, len } => {
            let mut data = vec![0u8; len as usize];
            match volume.read(offset, &mut data) {
                Ok(()) => {
                    let mut header = Vec::new();
                    if structured {
                        transmission::offset_data_header(&mut header, cookie, offset, len, true);
                    } else {
                        transmission::SimpleReply { error: 0, cookie }.encode(&mut header);
                    }
                    return Reply {
                        header,
                        data: Some(data),
                    };
                }
                Err(e) => Err(e),
            }
        }
        Command::Write { offset, fua, .. } => {
            let mut data = payload.unwrap_or_default();
            volume.write(offset, &mut data, fua)
        }
        Command::Flush => volume.flush(),
        Command::Trim { offset, len, fua } => volume.trim(offset, u64::from(len), fua),
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast,
        } => volume.write_zeroes(offset, u64::from(len), !no_hole, fast, fua),
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => match volume.allocation(offset, u64::from(len)) {
            Ok(runs) => {
                use crate::protocol::consts::state;
                let mut extents: Vec<(u32, u32)> = runs
                    .into_iter()
                    .filter(|(l, _)| *l > 0)
                    .map(|(l, hole)| {
                        let l = u32::try_from(l).unwrap_or(u32::MAX);
                        (l, if hole { state::HOLE | state::ZERO } else { 0 })
                    })
                    .collect();
                if req_one {
                    extents.truncate(1);
                }
                let mut header = Vec::new();
                transmission::block_status_chunk(
                    &mut header,
                    cookie,
                    ALLOCATION_CONTEXT_ID,
                    &extents,
                );
                return Reply { header, data: None };
            }
            Err(e) => Err(e),
        },
        Command::Disc => Ok(()),
    };
    match result {
        Ok(()) => ok_reply(structured, cookie),
        Err(e) => {
            tracing::debug!(cookie, error = %e, "request failed");
            error_reply(structured, cookie, e.nbd_errno(), &e.to_string())
        }
    }
}

async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Reply>,
) -> std::io::Result<()> {
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, &mut w);
    while let Some(r) = rx.recv().await {
        out.write_all(&r.header).await?;
        if let Some(d) = &r.data {
            out.write_all(d).await?;
        }
        // Flush only when no other reply is ready: batches small replies into one write.
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await?;
    w.shutdown().await
}

/// Serves requests until `DISC`, EOF, a protocol error or shutdown; waits for in-flight
/// requests before returning.
pub async fn serve<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    session: Session,
    mut shutdown: watch::Receiver<bool>,
) -> End {
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT * 2);
    let writer_task = tokio::spawn(writer(wr, rx));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(MAX_BUFFERED_BYTES));
    let volume = Arc::clone(&session.export.volume);
    let structured = session.structured;
    let cfg = volume.config().clone();
    let mut retired = session.export.retired.subscribe();
    let limits = Limits {
        size: volume.size(),
        read_only: cfg.read_only,
        structured,
        trim: cfg.discards && !cfg.read_only,
        block_status: session.block_status,
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
        match validate(&req, &limits) {
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
                if tx
                    .send(error_reply(structured, req.cookie, errno, msg))
                    .await
                    .is_err()
                {
                    break End::Error("reply writer stopped".into());
                }
            }
            Verdict::Run(Command::Disc) => break End::Clean,
            Verdict::Run(cmd) => {
                let (Ok(slot), payload_len) = (
                    Arc::clone(&in_flight).acquire_owned().await,
                    match cmd {
                        Command::Read { len, .. } | Command::Write { len, .. } => len,
                        _ => 0,
                    },
                ) else {
                    break End::Error("in-flight limiter closed".into());
                };
                let Ok(budget) = Arc::clone(&bytes).acquire_many_owned(payload_len).await else {
                    break End::Error("buffer limiter closed".into());
                };
                let payload = if let Command::Write { len, .. } = cmd {
                    let mut data = vec![0u8; len as usize];
                    if let Err(e) = rd.read_exact(&mut data).await {
                        break End::Error(format!("reading a write payload: {e}"));
                    }
                    Some(data)
                } else {
                    None
                };
                let volume = Arc::clone(&volume);
                let tx = tx.clone();
                let cookie = req.cookie;
                tokio::spawn(async move {
                    let reply = tokio::task::spawn_blocking(move || {
                        execute(&volume, structured, cookie, cmd, payload)
                    })
                    .await
                    .unwrap_or_else(|_| {
                        error_reply(structured, cookie, err::EIO, "internal error")
                    });
                    // The writer may be gone if the client vanished; nothing else to do then.
                    let _ = tx.send(reply).await;
                    drop((slot, budget));
                });
            }
        }
    };
    // Wait for every in-flight request to hand its reply to the writer.
    let _all = in_flight
        .acquire_many(u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX))
        .await;
    drop(tx);
    match writer_task.await {
        Ok(Ok(())) | Ok(Err(_)) => {}
        Err(e) => tracing::warn!(error = %e, "reply writer panicked"),
    }
    end
}
