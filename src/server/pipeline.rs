//! The request pipeline's shared vocabulary and its one policy decision: what a validated
//! request becomes ([`Work`]), what it produces ([`Reply`], carrying the [`Permits`] that bound
//! memory until the reply has left), what every connection shares ([`Resources`]), where a
//! request runs ([`placement`]), and which NBD error each volume failure is ([`errno_of`]).
//!
//! The flow, one owner per step:
//! `transmit` reads, validates (`validate`), admits (permits) and writes replies →
//! [`placement`] picks the thread → `execute::dispatch` runs the request there
//! (`execute::execute`) and sends its [`Reply`] back to `transmit`'s writer.
//! This module imports neither of them: the graph is `transmit → execute → pipeline`.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use super::buffers::{Buffer, BufferPool};
use super::validate::Command;
use super::workers::Workers;
use crate::protocol::consts::err;
use crate::protocol::transmission;
use crate::volume::VolumeError;

/// What every connection shares: the crypto workers and the payload buffers.
#[derive(Debug, Clone)]
pub struct Resources {
    /// Crypto workers for large requests.
    pub workers: Arc<Workers>,
    /// Payload buffers and the server-wide payload budget.
    pub buffers: Arc<BufferPool>,
}

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On the connection's task.
    Inline,
    /// Split across the crypto workers.
    Workers,
    /// On tokio's blocking pool (may wait for the disk).
    Blocking,
    /// Sent to the remote store without waiting; answered (a read decrypted first) by the
    /// thread that receives the store's reply. A write is encrypted on the connection's task.
    Submitted,
}

/// Where `cmd` runs, and whether it is split across the workers.
///
/// The rule was measured (`scripts/split-sweep.sh`, `BENCHMARKING.md`), not guessed:
/// - a request below the workers' split threshold runs inline: a hand-off costs more;
/// - a large *read* goes to the workers only when the client is pipelining (`pipelined`: other
///   requests of this connection are in flight). Then reads of different requests proceed in
///   parallel, which beat inline by ~30 % at QD16. Alone (QD1), inline was faster than any split:
///   on two cores the hand-offs cost more than a second core's cipher pass saved;
/// - a large *write* to a store whose writes the kernel serializes anyway (a regular file: the
///   inode lock) runs inline; in parallel it only contended for that lock (−20 % at QD16). To a
///   block device it follows the read rule;
/// - anything that may wait for the disk (`FLUSH`, FUA writes, `TRIM`, `WRITE_ZEROES`) runs on the
///   blocking pool, splitting a large FUA write where the read rule would;
/// - on a `remote` store (an upstream NBD export) every store call is a network round trip, so
///   nothing that touches the store runs inline (it would hold a tokio worker) or on the crypto
///   workers (each would wait a round trip, capping the requests in flight upstream at their
///   number): everything goes to the blocking pool, one thread per request in flight, unsplit.
///   Measured in the proxy benchmark (BENCHMARKING.md): seq 1 MiB reads QD16 gained, the rest
///   stayed within noise. Except reads: they are submitted (`Volume::submit_read`) and no
///   thread waits for them; the thread that receives the upstream's reply decrypts them in
///   place, in its receive buffer, which becomes the reply's (buffers are exchanged, not
///   copied). For 1 MiB reads that cost 0.86× the CPU per GB of the blocking pool's way (a
///   thread hop and a second 1 MiB buffer fewer; BENCHMARKING.md). And writes: encrypted
///   (inline below the split threshold, on a crypto worker above it: `split` then means that)
///   and submitted (`Volume::submit_write`), acknowledged by the thread that receives the
///   upstream's reply; `FUA` goes upstream as the write's flag (an upstream without it
///   declines, and the write waits for a flush on the blocking pool). Encrypting 1 MiB writes
///   on the connection's task measured 0.95× of the waiting way (that task then received and
///   encrypted every request of the connection in turn); on a worker 1.08× (BENCHMARKING.md).
pub fn placement(
    cmd: &Command,
    workers: &Workers,
    pipelined: bool,
    serial_writes: bool,
    remote: bool,
) -> (Placement, bool) {
    if remote {
        match *cmd {
            Command::Disc => {}
            Command::Read { .. } => return (Placement::Submitted, false),
            Command::Write { len, .. } => {
                return (Placement::Submitted, !workers.inline(len as usize));
            }
            _ => return (Placement::Blocking, false),
        }
    }
    local_placement(cmd, workers, pipelined, serial_writes)
}

/// [`placement`] for a store on this machine.
fn local_placement(
    cmd: &Command,
    workers: &Workers,
    pipelined: bool,
    serial_writes: bool,
) -> (Placement, bool) {
    match *cmd {
        Command::Read { len, .. } if !workers.inline(len as usize) && pipelined => {
            (Placement::Workers, true)
        }
        Command::Read { .. } => (Placement::Inline, false),
        Command::Write { len, fua, .. } => {
            let large = !workers.inline(len as usize) && !serial_writes;
            if fua {
                (Placement::Blocking, large)
            } else if large && pipelined {
                (Placement::Workers, true)
            } else {
                (Placement::Inline, false)
            }
        }
        Command::BlockStatus { .. } | Command::Disc | Command::Cache { .. } => {
            (Placement::Inline, false)
        }
        Command::Flush | Command::Trim { .. } | Command::WriteZeroes { .. } => {
            (Placement::Blocking, false)
        }
    }
}

/// Permits held until a reply has been written.
#[derive(Debug)]
#[allow(dead_code)] // held for their Drop, never read
pub struct Permits {
    /// One of the connection's in-flight request slots.
    pub slot: OwnedSemaphorePermit,
    /// The payload's bytes of the connection's budget.
    pub conn_bytes: Option<OwnedSemaphorePermit>,
    /// The payload's bytes of the server's budget.
    pub server_bytes: Option<OwnedSemaphorePermit>,
    /// The request's metrics (exports served with `--metrics-listen`); finished by the writer.
    pub mark: Option<crate::metrics::RequestMark>,
}

/// One reply: header bytes and optional data that follows them.
pub struct Reply {
    /// The reply header (simple reply or structured chunk header).
    pub header: Vec<u8>,
    /// Data that follows the header (a read's payload).
    pub data: Option<Buffer>,
    /// Released when the reply has left (or was dropped).
    pub permits: Option<Permits>,
    /// The NBD error value the reply carries (0: success).
    pub errno: u32,
}

/// The reply to a successful read of `data` (`len` bytes at `offset`).
pub fn read_reply(structured: bool, cookie: u64, offset: u64, len: u32, data: Buffer) -> Reply {
    let mut header = Vec::with_capacity(32);
    if structured {
        transmission::offset_data_header(&mut header, cookie, offset, len, true);
    } else {
        transmission::SimpleReply { error: 0, cookie }.encode(&mut header);
    }
    Reply {
        header,
        data: Some(data),
        permits: None,
        errno: 0,
    }
}

/// An error reply (structured: an error chunk carrying `msg`).
pub fn error_reply(structured: bool, cookie: u64, errno: u32, msg: &str) -> Reply {
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
        errno,
    }
}

/// A success reply without data.
pub fn ok_reply(structured: bool, cookie: u64) -> Reply {
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
        errno: 0,
    }
}

/// A validated request ready to run; it owns its payload, so it can move to another thread.
pub struct Work {
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The request's cookie.
    pub cookie: u64,
    /// What to do.
    pub cmd: Command,
    /// A write's payload.
    pub payload: Option<Buffer>,
    /// Split across the workers.
    pub split: bool,
}

/// The NBD error value for a volume failure. The volume knows nothing of NBD; the server
/// decides what a client is told.
pub fn errno_of(e: &VolumeError) -> u32 {
    match e {
        VolumeError::Io(io) => match io.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => err::ENOSPC,
            _ if io.kind() == std::io::ErrorKind::Unsupported => err::ENOTSUP,
            _ => err::EIO,
        },
        VolumeError::Crypto(_) => err::EIO,
        VolumeError::OutOfRange { .. } | VolumeError::Config(_) => err::EINVAL,
        VolumeError::ReadOnly => err::EPERM,
        VolumeError::Unsupported(_) => err::ENOTSUP,
        VolumeError::Withdrawn => err::ESHUTDOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_touching_a_remote_store_runs_inline_or_on_the_workers() {
        let workers = Workers::new(2, 128 * 1024).unwrap();
        let small_read = Command::Read {
            offset: 0,
            len: 4096,
        };
        let status = Command::BlockStatus {
            offset: 0,
            len: 4096,
            req_one: false,
        };
        let write = |len, fua| Command::Write {
            offset: 0,
            len,
            fua,
        };
        for (cmd, remote) in [
            (small_read, Placement::Submitted),
            (status, Placement::Blocking),
            (write(4096, false), Placement::Submitted),
        ] {
            assert_eq!(
                placement(&cmd, &workers, true, false, false).0,
                Placement::Inline
            );
            assert_eq!(
                placement(&cmd, &workers, true, false, true).0,
                remote,
                "{cmd:?}"
            );
        }
        // Nor on the crypto workers: a worker waiting for a network round trip would cap the
        // requests in flight upstream at the number of workers.
        let big = Command::Read {
            offset: 0,
            len: 1 << 20,
        };
        assert_eq!(
            placement(&big, &workers, true, false, false),
            (Placement::Workers, true)
        );
        // A large read is submitted too: it lands in the upstream's receive buffer and is
        // decrypted there in place, on the reader thread.
        assert_eq!(
            placement(&big, &workers, true, false, true),
            (Placement::Submitted, false)
        );
        assert_eq!(
            placement(&Command::Disc, &workers, true, false, true).0,
            Placement::Inline
        );
        // A FUA write is submitted with its flag (the upstream acknowledges it durable); it
        // waits for a flush on the blocking pool only locally.
        assert_eq!(
            placement(&write(4096, true), &workers, true, false, true),
            (Placement::Submitted, false)
        );
        assert_eq!(
            placement(&write(4096, true), &workers, true, false, false),
            (Placement::Blocking, false)
        );
        // A large write is encrypted on a worker before it is submitted (no worker waits for
        // the upstream); a small one inline.
        assert_eq!(
            placement(&write(1 << 20, false), &workers, true, false, true),
            (Placement::Submitted, true)
        );
        assert_eq!(
            placement(&write(4096, false), &workers, true, false, true),
            (Placement::Submitted, false)
        );
    }

    #[test]
    fn errno_of_maps_each_volume_failure() {
        assert_eq!(errno_of(&VolumeError::Unsupported("x")), err::ENOTSUP);
        assert_eq!(errno_of(&VolumeError::ReadOnly), err::EPERM);
        assert_eq!(errno_of(&VolumeError::Withdrawn), err::ESHUTDOWN);
        assert_eq!(
            errno_of(&VolumeError::Io(std::io::Error::from_raw_os_error(
                libc::ENOSPC
            ))),
            err::ENOSPC
        );
        assert_eq!(
            errno_of(&VolumeError::Io(std::io::Error::from_raw_os_error(
                libc::EIO
            ))),
            err::EIO
        );
    }
}
