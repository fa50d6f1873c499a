//! Running one validated request against the volume, and the replies it produces.
//!
//! `execute` is synchronous: the connection's task calls it inline for small requests, a crypto
//! worker or tokio's blocking pool for the others (`transmit::placement` decides). A reply
//! carries the request's permits, released when the writer has sent it.

use tokio::sync::OwnedSemaphorePermit;

use super::buffers::Buffer;
use super::negotiate::ALLOCATION_CONTEXT_ID;
use super::transmit::Resources;
use super::validate::Command;
use crate::protocol::transmission;
use crate::volume::EncryptedVolume;

/// Permits held until a reply has been written.
#[derive(Debug)]
#[allow(dead_code)] // held for their Drop, never read
pub(super) struct Permits {
    pub(super) slot: OwnedSemaphorePermit,
    pub(super) conn_bytes: Option<OwnedSemaphorePermit>,
    pub(super) server_bytes: Option<OwnedSemaphorePermit>,
}

/// One reply: header bytes and optional data that follows them.
pub(super) struct Reply {
    pub(super) header: Vec<u8>,
    pub(super) data: Option<Buffer>,
    /// Released when the reply has left (or was dropped).
    pub(super) permits: Option<Permits>,
}

pub(super) fn error_reply(structured: bool, cookie: u64, errno: u32, msg: &str) -> Reply {
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
    Reply {
        header,
        data: None,
        permits: None,
    }
}

fn ok_reply(structured: bool, cookie: u64) -> Reply {
    let mut header = Vec::new();
    if structured {
        transmission::none_chunk(&mut header, cookie);
    } else {
        transmission::SimpleReply { error: 0, cookie }.encode(&mut header);
    }
    Reply {
        header,
        data: None,
        permits: None,
    }
}

/// A validated request ready to run; it owns its payload, so it can move to another thread.
pub(super) struct Work {
    pub(super) structured: bool,
    pub(super) cookie: u64,
    pub(super) cmd: Command,
    pub(super) payload: Option<Buffer>,
    /// Split across the workers.
    pub(super) split: bool,
}

/// [`execute`], with a panic turned into an `EIO` reply for this request alone: logged with the
/// command, and everything else (the connection, the server, the workers' counters) carries
/// on. One behaviour wherever the request runs: inline, on a crypto worker (where rayon would
/// otherwise abort the process) or on the blocking pool.
pub(super) fn execute_guarded(
    volume: &EncryptedVolume,
    resources: &Resources,
    work: Work,
) -> Reply {
    let (structured, cookie, cmd) = (work.structured, work.cookie, work.cmd);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        execute(volume, resources, work)
    })) {
        Ok(reply) => reply,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(cookie, command = ?cmd, panic = what, "request panicked: answered EIO; the server carries on");
            error_reply(
                structured,
                cookie,
                crate::protocol::consts::err::EIO,
                "internal error",
            )
        }
    }
}

/// Executes a validated command on the volume (blocking) and builds its reply.
pub(super) fn execute(volume: &EncryptedVolume, resources: &Resources, work: Work) -> Reply {
    let Work {
        structured,
        cookie,
        cmd,
        payload,
        split,
    } = work;
    let result = match cmd {
        Command::Read { offset, len } => {
            crate::faults::panic_point(offset);
            let mut data = resources.buffers.take(len as usize);
            let done = if split {
                resources.workers.read(volume, offset, &mut data)
            } else {
                volume.read(offset, &mut data)
            };
            match done {
                Ok(()) => {
                    let mut header = Vec::with_capacity(32);
                    if structured {
                        transmission::offset_data_header(&mut header, cookie, offset, len, true);
                    } else {
                        transmission::SimpleReply { error: 0, cookie }.encode(&mut header);
                    }
                    return Reply {
                        header,
                        data: Some(data),
                        permits: None,
                    };
                }
                Err(e) => Err(e),
            }
        }
        Command::Write { offset, fua, .. } => {
            crate::faults::panic_point(offset);
            match payload {
                Some(mut data) if split => resources.workers.write(volume, offset, &mut data, fua),
                Some(mut data) => volume.write(offset, &mut data, fua),
                None => volume.write(offset, &mut [], fua),
            }
        }
        Command::Flush => volume.flush(),
        Command::Cache { offset, len } => volume.prefetch(offset, u64::from(len)),
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
                return Reply {
                    header,
                    data: None,
                    permits: None,
                };
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
