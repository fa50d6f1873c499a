//! Tests of the client against a scripted NBD server: behaviour no real peer here can be made
//! to show on demand (a server that refuses long unfragmented reads, replies that leave gaps
//! or overlap, fails a write once, answers block status for a context it never offered, fails block status). The server
//! speaks just enough fixed newstyle for
//! [`Client::connect`]; its export starts as [`byte_at`]'s pattern and keeps what is written.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

mod reads;
pub(crate) mod writes;

use super::NbdStore;
use crate::codec::Put;
use crate::protocol::consts::{chunk, cmd, cmd_flag, err, flag, handshake_flags, opt, rep, state};
use crate::protocol::transmission::REQUEST_LEN;
use crate::protocol::{ChunkHeader, Greeting, Info, OptionHeader, OptionReplyHeader, Request};
use crate::storage::Storage;

pub(crate) const SIZE: u64 = 8 << 20;

/// The (flags, length) of every read the server was sent.
type Seen = Arc<Mutex<Vec<(u16, u32)>>>;

/// The export's bytes, shared by the server's connections.
type Image = Arc<Mutex<Vec<u8>>>;

/// How the scripted server answers a read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Script {
    /// One data chunk; reads above 64 KiB with `DF` get `EOVERFLOW` (the spec allows it).
    RefuseLargeDf,
    /// Two data chunks covering only the first and last quarter.
    Gap,
    /// Two data chunks: the first half, then the first half again.
    Overlap,
    /// Closes the connection instead of answering a read.
    Hangup,
    /// Answers each read after 300 ms.
    Slow,
    /// Answers the first write with `EIO` (and keeps nothing of it), then as `RefuseLargeDf`.
    FailFirstWrite,
    /// Offers `base:allocation` as context 7, then answers block status for context 8.
    WrongContext,
    /// Offers `base:allocation` as context 7 and answers its block status queries in turn with
    /// `EIO`, with all of the range a hole, with `EINVAL`, and then with holes again.
    StatusErrors,
}

/// The byte the fake export holds at `offset`.
fn byte_at(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// Starts the server on a loopback port; returns its URI and the (flags, length) of every read
/// it was sent.
pub(crate) fn serve(script: Script) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let reads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reads);
    let image: Image = Arc::new(Mutex::new(expected(0, usize::try_from(SIZE).unwrap())));
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let statuses = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (seen, image, failed_once, statuses) = (
                Arc::clone(&seen),
                Arc::clone(&image),
                Arc::clone(&failed_once),
                Arc::clone(&statuses),
            );
            std::thread::spawn(move || {
                let _ = session(conn, script, &seen, &image, &failed_once, &statuses);
            });
        }
    });
    (format!("nbd://127.0.0.1:{port}/"), reads)
}

fn option_reply(
    s: &mut TcpStream,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut out = Vec::new();
    OptionReplyHeader {
        option,
        reply_type,
        len: u32::try_from(data.len()).unwrap(),
    }
    .encode(&mut out);
    out.extend_from_slice(data);
    s.write_all(&out)
}

fn chunk_out(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    ChunkHeader {
        flags,
        kind,
        cookie,
        length: u32::try_from(payload.len()).unwrap(),
    }
    .encode(out);
    out.extend_from_slice(payload);
}

fn data_chunk(out: &mut Vec<u8>, done: bool, cookie: u64, at: u64, image: &Image, len: u32) {
    let mut p = Vec::with_capacity(8 + len as usize);
    p.put_u64(at);
    let at = usize::try_from(at).unwrap();
    p.extend_from_slice(&image.lock().unwrap()[at..at + len as usize]);
    chunk_out(
        out,
        if done { chunk::FLAG_DONE } else { 0 },
        chunk::OFFSET_DATA,
        cookie,
        &p,
    );
}

/// A block status reply for `context`: one descriptor of `len` bytes with `flags`.
fn status_chunk(out: &mut Vec<u8>, cookie: u64, context: u32, len: u32, flags: u32) {
    let mut p = Vec::new();
    p.put_u32(context);
    p.put_u32(len);
    p.put_u32(flags);
    chunk_out(out, chunk::FLAG_DONE, chunk::BLOCK_STATUS, cookie, &p);
}

fn error_chunk(out: &mut Vec<u8>, cookie: u64, errno: u32) {
    let mut p = Vec::new();
    p.put_u32(errno);
    p.put_u16(0);
    chunk_out(out, chunk::FLAG_DONE, chunk::ERROR, cookie, &p);
}

fn session(
    mut s: TcpStream,
    script: Script,
    seen: &Mutex<Vec<(u16, u32)>>,
    image: &Image,
    failed_once: &std::sync::atomic::AtomicBool,
    statuses: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    let mut out = Vec::new();
    Greeting {
        flags: handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
    }
    .encode(&mut out);
    s.write_all(&out)?;
    let mut client_flags = [0u8; 4];
    s.read_exact(&mut client_flags)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let o = OptionHeader::decode(&h).map_err(std::io::Error::other)?;
        let mut data = vec![0u8; o.len as usize];
        s.read_exact(&mut data)?;
        match o.code {
            opt::STRUCTURED_REPLY => option_reply(&mut s, o.code, rep::ACK, &[])?,
            opt::SET_META_CONTEXT
                if matches!(script, Script::WrongContext | Script::StatusErrors) =>
            {
                let mut ctx = 7u32.to_be_bytes().to_vec();
                ctx.extend_from_slice(crate::protocol::consts::BASE_ALLOCATION.as_bytes());
                option_reply(&mut s, o.code, rep::META_CONTEXT, &ctx)?;
                option_reply(&mut s, o.code, rep::ACK, &[])?;
            }
            opt::GO => {
                let mut info = Vec::new();
                Info::Export {
                    size: SIZE,
                    flags: flag::HAS_FLAGS | flag::SEND_DF | flag::SEND_FLUSH,
                }
                .encode(&mut info);
                option_reply(&mut s, o.code, rep::INFO, &info)?;
                option_reply(&mut s, o.code, rep::ACK, &[])?;
                break;
            }
            code => option_reply(&mut s, code, rep::ERR_UNSUP, &[])?,
        }
    }
    loop {
        let mut h = [0u8; REQUEST_LEN];
        s.read_exact(&mut h)?;
        let r = Request::decode(&h).map_err(std::io::Error::other)?;
        let mut out = Vec::new();
        match r.kind {
            cmd::DISC => return Ok(()),
            cmd::READ => {
                seen.lock().unwrap().push((r.flags, r.length));
                let quarter = r.length / 4;
                match script {
                    Script::Hangup => return Ok(()),
                    Script::Slow => {
                        std::thread::sleep(std::time::Duration::from_millis(300));
                        data_chunk(&mut out, true, r.cookie, r.offset, image, r.length);
                    }
                    Script::RefuseLargeDf
                    | Script::FailFirstWrite
                    | Script::WrongContext
                    | Script::StatusErrors
                        if r.flags & cmd_flag::DF != 0 && r.length > 65536 =>
                    {
                        error_chunk(&mut out, r.cookie, err::EOVERFLOW);
                    }
                    Script::RefuseLargeDf
                    | Script::FailFirstWrite
                    | Script::WrongContext
                    | Script::StatusErrors => {
                        data_chunk(&mut out, true, r.cookie, r.offset, image, r.length);
                    }
                    Script::Gap => {
                        data_chunk(&mut out, false, r.cookie, r.offset, image, quarter);
                        let last = r.offset + u64::from(r.length - quarter);
                        data_chunk(&mut out, true, r.cookie, last, image, quarter);
                    }
                    Script::Overlap => {
                        data_chunk(&mut out, false, r.cookie, r.offset, image, 2 * quarter);
                        data_chunk(&mut out, true, r.cookie, r.offset, image, 2 * quarter);
                    }
                }
            }
            cmd::WRITE => {
                let mut data = vec![0u8; r.length as usize];
                s.read_exact(&mut data)?;
                let fail = script == Script::FailFirstWrite
                    && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst);
                if fail {
                    error_chunk(&mut out, r.cookie, err::EIO);
                } else {
                    let at = usize::try_from(r.offset).unwrap();
                    image.lock().unwrap()[at..at + data.len()].copy_from_slice(&data);
                    chunk_out(&mut out, chunk::FLAG_DONE, chunk::NONE, r.cookie, &[]);
                }
            }
            cmd::BLOCK_STATUS if script == Script::StatusErrors => {
                let n = statuses.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match n {
                    0 => error_chunk(&mut out, r.cookie, err::EIO),
                    2 => error_chunk(&mut out, r.cookie, err::EINVAL),
                    _ => status_chunk(&mut out, r.cookie, 7, r.length, state::HOLE | state::ZERO),
                }
            }
            cmd::BLOCK_STATUS => status_chunk(&mut out, r.cookie, 8, r.length, 0),
            _ => chunk_out(&mut out, chunk::FLAG_DONE, chunk::NONE, r.cookie, &[]),
        }
        s.write_all(&out)?;
    }
}

fn expected(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(byte_at).collect()
}
