//! Tests of the client against a scripted NBD server: behaviour no real peer here can be made
//! to show on demand (a server that refuses long unfragmented reads, replies that leave gaps
//! or overlap). The server speaks just enough fixed newstyle for [`Client::connect`].

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use super::NbdStore;
use crate::codec::Put;
use crate::protocol::consts::{chunk, cmd, cmd_flag, err, flag, handshake_flags, opt, rep};
use crate::protocol::transmission::REQUEST_LEN;
use crate::protocol::{ChunkHeader, Greeting, Info, OptionHeader, OptionReplyHeader, Request};
use crate::storage::Storage;

const SIZE: u64 = 8 << 20;

/// The (flags, length) of every read the server was sent.
type Seen = Arc<Mutex<Vec<(u16, u32)>>>;

/// How the scripted server answers a read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Script {
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
}

/// The byte the fake export holds at `offset`.
fn byte_at(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// Starts the server on a loopback port; returns its URI and the (flags, length) of every read
/// it was sent.
fn serve(script: Script) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let reads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reads);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let _ = session(conn, script, &seen);
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

fn data_chunk(out: &mut Vec<u8>, done: bool, cookie: u64, at: u64, len: u32) {
    let mut p = Vec::with_capacity(8 + len as usize);
    p.put_u64(at);
    p.extend((at..at + u64::from(len)).map(byte_at));
    chunk_out(
        out,
        if done { chunk::FLAG_DONE } else { 0 },
        chunk::OFFSET_DATA,
        cookie,
        &p,
    );
}

fn session(mut s: TcpStream, script: Script, seen: &Mutex<Vec<(u16, u32)>>) -> std::io::Result<()> {
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
                        data_chunk(&mut out, true, r.cookie, r.offset, r.length);
                    }
                    Script::RefuseLargeDf if r.flags & cmd_flag::DF != 0 && r.length > 65536 => {
                        let mut p = Vec::new();
                        p.put_u32(err::EOVERFLOW);
                        p.put_u16(0);
                        chunk_out(&mut out, chunk::FLAG_DONE, chunk::ERROR, r.cookie, &p);
                    }
                    Script::RefuseLargeDf => {
                        data_chunk(&mut out, true, r.cookie, r.offset, r.length)
                    }
                    Script::Gap => {
                        data_chunk(&mut out, false, r.cookie, r.offset, quarter);
                        let last = r.offset + u64::from(r.length - quarter);
                        data_chunk(&mut out, true, r.cookie, last, quarter);
                    }
                    Script::Overlap => {
                        data_chunk(&mut out, false, r.cookie, r.offset, 2 * quarter);
                        data_chunk(&mut out, true, r.cookie, r.offset, 2 * quarter);
                    }
                }
            }
            _ => chunk_out(&mut out, chunk::FLAG_DONE, chunk::NONE, r.cookie, &[]),
        }
        s.write_all(&out)?;
    }
}

fn expected(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(byte_at).collect()
}

#[test]
fn long_reads_ask_for_df_until_the_upstream_refuses_it_once() {
    let (uri, seen) = serve(Script::RefuseLargeDf);
    let store = NbdStore::open(&uri).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    store.read_at(&mut buf, 4096).unwrap();
    assert!(
        buf == expected(4096, buf.len()),
        "the retried read returns the data"
    );
    store.read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf == expected(1 << 20, buf.len()));
    let mut small = vec![0u8; 65536];
    store.read_at(&mut small, 512).unwrap();
    assert!(small == expected(512, small.len()));
    let df = cmd_flag::DF;
    assert_eq!(
        *seen.lock().unwrap(),
        [(df, 1 << 20), (0, 1 << 20), (0, 1 << 20), (df, 65536)],
        "DF on the first long read; after its EOVERFLOW, long reads without DF; short reads keep it"
    );
}

#[test]
fn reads_recycle_their_buffers_and_stay_exact() {
    let (uri, _) = serve(Script::RefuseLargeDf);
    let store = NbdStore::open(&uri).unwrap();
    // Different lengths and offsets through the same recycled buffers: any byte the reply did
    // not send would show as a previous read's byte.
    for (i, len) in [65536usize, 4096, 65536, 512, 32768, 65536]
        .into_iter()
        .enumerate()
    {
        let offset = (i as u64 * 7 + 1) * 4096;
        let mut got = Vec::new();
        let done = store
            .read_in_place(offset, len, &mut |at, piece| {
                assert_eq!(at, got.len());
                got.extend_from_slice(piece);
            })
            .unwrap();
        assert!(done);
        assert!(
            got == expected(offset, len),
            "read {i}: {len} bytes at {offset}"
        );
    }
}

/// A reply that does not cover its request is a protocol violation: the read fails (the
/// connection is dropped and, the server doing it again, the request gives up), and never
/// hands on bytes the server did not send (a recycled buffer's old contents).
#[test]
fn a_read_reply_with_a_gap_or_an_overlap_fails_instead_of_returning_stale_bytes() {
    for (script, why) in [
        (Script::Gap, "left a gap"),
        (Script::Overlap, "overlapped itself"),
    ] {
        let (uri, _) = serve(script);
        let opts = super::Options {
            timeout: std::time::Duration::from_millis(300),
            connections: 1,
        };
        let store = NbdStore::open_with(&uri, &opts).unwrap();
        let mut buf = vec![0xAAu8; 65536];
        let e = store.read_at(&mut buf, 0).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(why) && text.contains("kept failing"),
            "{text}"
        );
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(buf.iter().all(|&b| b == 0xAA), "nothing was handed on");
    }
}

/// Reads submitted without waiting complete on the reply reader thread, in any order, each
/// with its own bytes (through recycled buffers), and nothing waits for them.
#[test]
fn submitted_reads_complete_on_the_reader_thread_with_their_own_bytes() {
    let (uri, _) = serve(Script::RefuseLargeDf);
    let store = NbdStore::open(&uri).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let count = 200u64;
    for i in 0..count {
        let (offset, len) = ((i * 37 % 2000) * 4096, 4096 * (1 + (i % 16) as usize));
        let tx = tx.clone();
        let done: crate::storage::ReadDone = Box::new(move |data: Option<&[u8]>| {
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            let _ = tx.send((offset, len, data.map(<[u8]>::to_vec), thread));
        });
        assert!(
            store.submit_read(offset, len, done).is_ok(),
            "read {i} started"
        );
    }
    for _ in 0..count {
        let (offset, len, data, thread) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("every submitted read completes");
        let data = data.expect("the read succeeded");
        assert_eq!(data.len(), len);
        assert!(data == expected(offset, len), "{len} bytes at {offset}");
        assert_eq!(thread, "nbdcrypt-upstream");
    }
    // Past the export's end or unaligned: handed back, for the waiting read.
    let noop: crate::storage::ReadDone = Box::new(|_| {});
    assert!(store.submit_read(SIZE - 4096, 8192, noop).is_err());
}

/// A submitted read whose connection dies before its reply is told so (`None`), and a read
/// submitted on the dead connection is handed back: nothing is left waiting forever.
#[test]
fn a_submitted_read_on_a_dying_connection_is_told_it_failed() {
    let (uri, _) = serve(Script::Hangup);
    let store = NbdStore::open(&uri).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let done: crate::storage::ReadDone = Box::new(move |data: Option<&[u8]>| {
        let _ = tx.send(data.is_some());
    });
    assert!(store.submit_read(0, 4096, done).is_ok());
    let ok = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the read is completed when its connection dies");
    assert!(!ok, "a read the server never answered failed");
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    let done: crate::storage::ReadDone = Box::new(move |data: Option<&[u8]>| {
        let _ = tx.send(data.is_some());
    });
    if let Err(back) = store.submit_read(0, 4096, done) {
        back(None);
    }
    assert_eq!(
        rx.recv_timeout(std::time::Duration::from_secs(10)),
        Ok(false),
        "handed back (or failed): never left waiting"
    );
}

/// The completion of a submitted read can hold the last reference to the store (a volume
/// dropped while its read was in flight): the store, and so the connection, is then dropped on
/// the reader thread itself, which must not wait for its own end.
#[test]
fn a_store_dropped_by_its_own_read_completion_shuts_down_cleanly() {
    // The reply comes after this thread has dropped its reference.
    let (uri, _) = serve(Script::Slow);
    let store = std::sync::Arc::new(NbdStore::open(&uri).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let last = std::sync::Arc::clone(&store);
    let done: crate::storage::ReadDone = Box::new(move |data: Option<&[u8]>| {
        let ok = data.is_some();
        drop(last);
        let _ = tx.send(ok);
    });
    assert!(store.submit_read(0, 4096, done).is_ok());
    drop(store);
    assert_eq!(
        rx.recv_timeout(std::time::Duration::from_secs(10)),
        Ok(true),
        "the completion ran to its end after dropping the store"
    );
}
