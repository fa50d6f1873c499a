//! Running one validated request: [`dispatch`] sends it where [`placement`] said (inline, the
//! crypto workers or the blocking pool) and the reply back to the connection's writer;
//! [`execute`] runs it against the volume and builds the reply. Synchronous; it never reads
//! the socket and never decides admission (that is `transmit`'s).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::negotiate::ALLOCATION_CONTEXT_ID;
use super::pipeline::{
    Permits, Placement, Reply, Resources, Work, errno_of, error_reply, ok_reply, placement,
    read_reply,
};
use super::validate::Command;
use crate::protocol::transmission;
use crate::volume::{EncryptedVolume, Written};

/// Runs `work` where [`placement`] puts it and sends its reply, with `permits` attached, to
/// the connection's writer. Inline work is done before this returns; work placed on the
/// workers or the blocking pool sends its own reply when done (no task waits for it). Returns
/// where it ran. A vanished writer (the client left) simply drops the reply.
pub async fn dispatch(
    volume: &Arc<EncryptedVolume>,
    resources: &Resources,
    work: Work,
    permits: Permits,
    pipelined: bool,
    tx: &mpsc::Sender<Reply>,
) -> Result<Placement, mpsc::error::SendError<Reply>> {
    let (place, split) = placement(
        &work.cmd,
        &resources.workers,
        pipelined,
        volume.serializes_writes(),
        volume.store_is_remote(),
    );
    let work = Work { split, ..work };
    match place {
        Placement::Inline => {
            let mut reply = execute_guarded(volume, resources, work);
            reply.permits = Some(permits);
            tx.send(reply).await?;
        }
        Placement::Workers => {
            let (tx, volume, res) = (tx.clone(), Arc::clone(volume), resources.clone());
            resources.workers.spawn(move || {
                let mut reply = execute_guarded(&volume, &res, work);
                reply.permits = Some(permits);
                let _ = tx.blocking_send(reply);
            });
        }
        Placement::Blocking => blocking(volume, resources, work, permits, tx),
        Placement::Submitted => submit(volume, resources, work, permits, tx),
    }
    Ok(place)
}

/// Runs `work` on the blocking pool; its reply goes to `tx`.
fn blocking(
    volume: &Arc<EncryptedVolume>,
    resources: &Resources,
    work: Work,
    permits: Permits,
    tx: &mpsc::Sender<Reply>,
) {
    let (tx, volume, res) = (tx.clone(), Arc::clone(volume), resources.clone());
    tokio::task::spawn_blocking(move || {
        let mut reply = execute_guarded(&volume, &res, work);
        reply.permits = Some(permits);
        let _ = tx.blocking_send(reply);
    });
}

/// Submits a read or a write (`Placement::Submitted`): the thread that receives the store's
/// reply decrypts a read and queues the reply. A write is encrypted first, on this task or
/// (`split`: a large one) on a crypto worker, which then submits it. Whatever this path cannot
/// do (a failed request, a dead connection, a withdrawn key, a panic) runs again on the
/// blocking pool, the waiting way (a write's ciphertext is written as it is, not encrypted
/// twice).
fn submit(
    volume: &Arc<EncryptedVolume>,
    resources: &Resources,
    work: Work,
    permits: Permits,
    tx: &mpsc::Sender<Reply>,
) {
    let (structured, cookie) = (work.structured, work.cookie);
    let (tx, vol, res) = (tx.clone(), Arc::clone(volume), resources.clone());
    let runtime = tokio::runtime::Handle::current();
    match work.cmd {
        Command::Read { offset, len } => {
            let data = resources.buffers.take(len as usize);
            volume.submit_read(offset, data, move |read| match read {
                Ok(data) => {
                    let reply = read_reply(structured, cookie, offset, len, data);
                    answer(&runtime, &tx, reply, permits);
                }
                Err(_) => {
                    let _enter = runtime.enter();
                    blocking(&vol, &res, work, permits, &tx);
                }
            });
        }
        Command::Write { offset, fua, .. } => {
            let Work { payload, .. } = work;
            let Some(data) = payload else {
                return blocking(volume, resources, Work { payload, ..work }, permits, &tx);
            };
            let (cmd, on_workers) = (work.cmd, work.split);
            let volume = Arc::clone(volume);
            let start = move || {
                volume.submit_write(offset, data, fua, move |written| {
                    let result = match written {
                        Written::Done => Ok(()),
                        Written::Failed(e) => Err(e),
                        Written::Declined(data) => {
                            let work = Work {
                                structured,
                                cookie,
                                cmd,
                                payload: Some(data),
                                split: false,
                            };
                            let _enter = runtime.enter();
                            return blocking(&vol, &res, work, permits, &tx);
                        }
                        // Never waited for here: this may be the store's reply reader.
                        Written::Pending(ciphertext) => {
                            let handle = runtime.clone();
                            runtime.spawn_blocking(move || {
                                let done = ciphertext.write();
                                let reply = outcome_reply(structured, cookie, &cmd, done);
                                answer(&handle, &tx, reply, permits);
                            });
                            return;
                        }
                    };
                    let reply = outcome_reply(structured, cookie, &cmd, result);
                    answer(&runtime, &tx, reply, permits);
                });
            };
            if on_workers {
                resources.workers.spawn(start);
            } else {
                start();
            }
        }
        _ => blocking(volume, resources, work, permits, &tx),
    }
}

/// Queues `reply` (with `permits`) for the connection's writer without ever blocking the
/// calling thread (the store's reply reader): a full queue hands it to a task instead.
fn answer(
    runtime: &tokio::runtime::Handle,
    tx: &mpsc::Sender<Reply>,
    mut reply: Reply,
    permits: Permits,
) {
    reply.permits = Some(permits);
    if let Err(mpsc::error::TrySendError::Full(reply)) = tx.try_send(reply) {
        let tx = tx.clone();
        runtime.spawn(async move {
            let _ = tx.send(reply).await;
        });
    }
}

/// [`execute`], with a panic turned into an `EIO` reply for this request alone: logged with the
/// command, and everything else (the connection, the server, the workers' counters) carries
/// on. One behaviour wherever the request runs: inline, on a crypto worker (where rayon would
/// otherwise abort the process) or on the blocking pool.
fn execute_guarded(volume: &EncryptedVolume, resources: &Resources, work: Work) -> Reply {
    let (structured, cookie, cmd) = (work.structured, work.cookie, work.cmd);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        execute(volume, resources, work)
    })) {
        Ok(reply) => reply,
        Err(panic) => {
            let what = crate::faults::panic_message(&*panic);
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
pub fn execute(volume: &EncryptedVolume, resources: &Resources, work: Work) -> Reply {
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
                Ok(()) => return read_reply(structured, cookie, offset, len, data),
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
                    errno: 0,
                };
            }
            Err(e) => Err(e),
        },
        Command::Disc => Ok(()),
    };
    outcome_reply(structured, cookie, &cmd, result)
}

/// The reply to a request that carries no data.
fn outcome_reply(
    structured: bool,
    cookie: u64,
    cmd: &Command,
    result: Result<(), crate::volume::VolumeError>,
) -> Reply {
    match result {
        Ok(()) => ok_reply(structured, cookie),
        Err(e) => {
            tracing::debug!(cookie, command = ?cmd, error = %e, "request failed");
            error_reply(structured, cookie, errno_of(&e), &e.to_string())
        }
    }
}
