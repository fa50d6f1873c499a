//! Hostile and malformed NBD traffic from a raw client. Every case expects the spec's answer or
//! a disconnect of that client only, and the server must keep serving a well-behaved client
//! throughout. Also: unaligned writes (read-modify-write) and out-of-order pipelined replies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Rng, Server, TempDir, key_file, seed};
use nbdcrypt::protocol::consts::{chunk, client_flags, cmd, cmd_flag, err, opt, rep};
use nbdcrypt::protocol::handshake::OPTION_REPLY_HEADER_LEN;
use nbdcrypt::protocol::transmission::{CHUNK_HEADER_LEN, SIMPLE_REPLY_LEN};
use nbdcrypt::protocol::{
    ChunkHeader, InfoRequest, OptionHeader, OptionReplyHeader, Request, SimpleReply,
};

const SIZE: u64 = 16 << 20;

struct Client {
    s: TcpStream,
}

impl Client {
    fn connect(addr: &str) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client { s };
        let mut greeting = [0u8; 18];
        c.s.read_exact(&mut greeting).unwrap();
        c
    }

    fn hello(addr: &str) -> Client {
        let mut c = Self::connect(addr);
        c.send(&(client_flags::C_FIXED_NEWSTYLE | client_flags::C_NO_ZEROES).to_be_bytes());
        c
    }

    fn send(&mut self, b: &[u8]) {
        // The server may already have closed; the following read tells.
        let _ = self.s.write_all(b);
    }

    fn option(&mut self, code: u32, data: &[u8]) {
        let mut b = Vec::new();
        OptionHeader {
            code,
            len: u32::try_from(data.len()).unwrap(),
        }
        .encode(&mut b);
        b.extend_from_slice(data);
        self.send(&b);
    }

    fn option_reply(&mut self) -> Option<(OptionReplyHeader, Vec<u8>)> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).ok()?;
        let h = OptionReplyHeader::decode(&h).unwrap();
        let mut d = vec![0u8; h.len as usize];
        self.s.read_exact(&mut d).ok()?;
        Some((h, d))
    }

    /// Reads replies until ACK or an error; returns the last reply type.
    fn until_done(&mut self) -> u32 {
        loop {
            let (h, _) = self.option_reply().expect("option reply");
            if h.reply_type == rep::ACK || h.reply_type & (1 << 31) != 0 {
                return h.reply_type;
            }
        }
    }

    fn go(&mut self, name: &str) {
        let mut d = Vec::new();
        InfoRequest {
            name: name.into(),
            requests: vec![],
        }
        .encode(&mut d);
        self.option(opt::GO, &d);
        assert_eq!(self.until_done(), rep::ACK);
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::new();
        Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode(&mut b);
        b.extend_from_slice(payload);
        self.send(&b);
    }

    fn simple_reply(&mut self, data_len: usize) -> Option<(SimpleReply, Vec<u8>)> {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).ok()?;
        let r = SimpleReply::decode(&h).unwrap();
        let mut d = vec![0u8; if r.error == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut d).ok()?;
        Some((r, d))
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn good_client_still_works(addr: &str, rng: &mut Rng) {
    let mut c = Client::hello(addr);
    c.go("d");
    let data = rng.bytes(8192);
    c.request(cmd::WRITE, 0, 1, 40960, 8192, &data);
    assert_eq!(c.simple_reply(0).unwrap().0.error, 0);
    c.request(cmd::READ, 0, 2, 40960, 8192, &[]);
    let (r, got) = c.simple_reply(8192).unwrap();
    assert_eq!((r.error, r.cookie), (0, 2));
    assert!(got == data);
    c.request(cmd::DISC, 0, 3, 0, 0, &[]);
}

fn start(dir: &TempDir, rng: &mut Rng) -> Server {
    let (key, _) = key_file(dir, "k", rng);
    Server::start(
        dir,
        &[format!(
            "name=d,file={},key-file={},size={SIZE},discards",
            dir.path("d.img").display(),
            key.display()
        )],
    )
}

#[test]
fn malformed_handshakes_disconnect_only_that_client() {
    let dir = TempDir::new("hostile-hs");
    let mut rng = Rng::new(seed("hostile handshake"));
    let server = start(&dir, &mut rng);
    let addr = server.addr.clone();

    // Unknown client flags.
    let mut c = Client::connect(&addr);
    c.send(&0xffff_ffffu32.to_be_bytes());
    assert!(c.closed());
    // Not fixed newstyle.
    let mut c = Client::connect(&addr);
    c.send(&0u32.to_be_bytes());
    assert!(c.closed());
    // Wrong option magic.
    let mut c = Client::hello(&addr);
    c.send(&[0x42; 16]);
    assert!(c.closed());
    // An option length far too large to skip.
    let mut c = Client::hello(&addr);
    c.option_header_only(opt::INFO, 64 << 20);
    assert!(c.closed());
    // Garbage then EOF mid-header.
    let mut c = Client::hello(&addr);
    c.send(&[0x49, 0x48, 0x41]);
    drop(c);

    good_client_still_works(&addr, &mut rng);
    drop(server);
}

impl Client {
    fn option_header_only(&mut self, code: u32, len: u32) {
        let mut b = Vec::new();
        OptionHeader { code, len }.encode(&mut b);
        self.send(&b);
    }
}

#[test]
fn bad_options_get_errors_without_losing_sync() {
    let dir = TempDir::new("hostile-opt");
    let mut rng = Rng::new(seed("hostile options"));
    let server = start(&dir, &mut rng);
    let mut c = Client::hello(&server.addr);

    // An INFO whose name length lies (claims 100 bytes, carries 3).
    let mut d = Vec::new();
    d.extend_from_slice(&100u32.to_be_bytes());
    d.extend_from_slice(b"abc");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(opt::INFO, &d);
    assert_eq!(c.until_done(), rep::ERR_INVALID);
    // Unknown option with data.
    c.option(999, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!(c.until_done(), rep::ERR_UNSUP);
    // STARTTLS before the TLS issue.
    c.option(opt::STARTTLS, &[]);
    assert_eq!(c.until_done(), rep::ERR_UNSUP);
    // Extended headers are not offered.
    c.option(opt::EXTENDED_HEADERS, &[]);
    assert_eq!(c.until_done(), rep::ERR_UNSUP);
    // Too large but skippable: answered, then the stream is still in sync.
    c.option(opt::LIST, &vec![0u8; 100 * 1024]);
    assert_eq!(c.until_done(), rep::ERR_TOO_BIG);
    // LIST with data is invalid; without, it lists.
    c.option(opt::LIST, &[0]);
    assert_eq!(c.until_done(), rep::ERR_INVALID);
    c.option(opt::LIST, &[]);
    assert_eq!(c.until_done(), rep::ACK);
    // SET_META_CONTEXT before STRUCTURED_REPLY is invalid.
    c.option(opt::SET_META_CONTEXT, &[0, 0, 0, 1, b'd', 0, 0, 0, 0]);
    assert_eq!(c.until_done(), rep::ERR_INVALID);
    // Unknown export.
    let mut d = Vec::new();
    InfoRequest {
        name: "nope".into(),
        requests: vec![],
    }
    .encode(&mut d);
    c.option(opt::INFO, &d);
    assert_eq!(c.until_done(), rep::ERR_UNKNOWN);
    // After all that, GO still works and data flows.
    c.go("d");
    c.request(cmd::READ, 0, 9, 0, 4096, &[]);
    let (r, _) = c.simple_reply(4096).unwrap();
    assert_eq!((r.error, r.cookie), (0, 9));
}

#[test]
fn bad_requests_get_spec_errors_and_the_connection_goes_on() {
    let dir = TempDir::new("hostile-req");
    let mut rng = Rng::new(seed("hostile requests"));
    let server = start(&dir, &mut rng);
    let mut c = Client::hello(&server.addr);
    c.go("d");
    let cases: [(u16, u16, u64, u32, Vec<u8>, u32); 7] = [
        (77, 0, 0, 0, vec![], err::EINVAL), // unknown command
        (cmd::READ, 0, SIZE - 100, 512, vec![], err::EINVAL), // read past the end
        (cmd::READ, 0, u64::MAX - 10, 512, vec![], err::EINVAL), // offset overflow
        (cmd::WRITE, 0, SIZE - 100, 512, vec![7; 512], err::ENOSPC), // write past the end
        (cmd::READ, 0, 0, (64 << 20) + 1, vec![], err::EOVERFLOW), // longer than the maximum
        (cmd::READ, cmd_flag::DF, 0, 512, vec![], err::EINVAL), // DF without structured replies
        (cmd::WRITE, 1 << 12, 0, 512, vec![9; 512], err::EINVAL), // unknown flag on a write
    ];
    for (i, (kind, flags, offset, len, payload, errno)) in cases.into_iter().enumerate() {
        let cookie = 100 + i as u64;
        c.request(kind, flags, cookie, offset, len, &payload);
        let (r, _) = c.simple_reply(0).expect("a reply, not a disconnect");
        assert_eq!((r.error, r.cookie), (errno, cookie), "case {i}");
    }
    // Still in sync: an unaligned write and read work.
    let data = rng.bytes(3000);
    c.request(cmd::WRITE, cmd_flag::FUA, 1, 1000, 3000, &data);
    assert_eq!(c.simple_reply(0).unwrap().0.error, 0);
    c.request(cmd::READ, 0, 2, 1000, 3000, &[]);
    assert!(c.simple_reply(3000).unwrap().1 == data);
    // A write larger than the maximum cannot be skipped safely: disconnect.
    c.request(cmd::WRITE, 0, 3, 0, (64 << 20) + 1, &[]);
    assert!(c.closed());
    // A bad request magic: disconnect.
    let mut c = Client::hello(&server.addr);
    c.go("d");
    c.send(&[0u8; 28]);
    assert!(c.closed());
    good_client_still_works(&server.addr, &mut rng);
}

#[test]
fn random_bytes_after_the_greeting_never_stop_the_server() {
    let dir = TempDir::new("hostile-fuzz");
    let mut rng = Rng::new(seed("hostile fuzz"));
    let server = start(&dir, &mut rng);
    for round in 0..200 {
        let mut c = Client::connect(&server.addr);
        let len = 1 + usize::try_from(rng.below(200)).unwrap();
        let mut junk = rng.bytes(len);
        if round % 2 == 0 {
            // Half the time start with valid flags and a valid option magic, to get deeper.
            let mut head = (client_flags::C_FIXED_NEWSTYLE).to_be_bytes().to_vec();
            head.extend_from_slice(&nbdcrypt::protocol::consts::IHAVEOPT.to_be_bytes());
            head.append(&mut junk);
            junk = head;
        }
        c.send(&junk);
        c.s.shutdown(std::net::Shutdown::Write).ok();
        // Drain whatever the server answers until it closes.
        let mut sink = Vec::new();
        let _ = c.s.read_to_end(&mut sink);
    }
    good_client_still_works(&server.addr, &mut rng);
}

#[test]
fn structured_replies_pipelining_and_unaligned_writes() {
    let dir = TempDir::new("pipeline");
    let mut rng = Rng::new(seed("pipeline"));
    let server = start(&dir, &mut rng);
    let mut c = Client::hello(&server.addr);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.until_done(), rep::ACK);
    c.go("d");

    // 60 pipelined unaligned writes, sent before reading any reply. They run concurrently, so
    // they must not overlap (NBD leaves the order of overlapping in-flight writes open), but
    // neighbours share partly written sectors: every sector edge is a concurrent RMW.
    let mut model = vec![0u8; 1 << 20];
    let mut sent = HashMap::new();
    for i in 0..60u64 {
        let off = i * 17_000 + rng.below(1000);
        let len = 1 + usize::try_from(rng.below(16_000)).unwrap();
        let data = rng.bytes(len);
        let o = usize::try_from(off).unwrap();
        model[o..o + len].copy_from_slice(&data);
        c.request(
            cmd::WRITE,
            0,
            1000 + i,
            off,
            u32::try_from(len).unwrap(),
            &data,
        );
        sent.insert(1000 + i, ());
    }
    for _ in 0..60 {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        c.s.read_exact(&mut h).unwrap();
        let h = ChunkHeader::decode(&h).unwrap();
        assert_eq!(
            (h.kind, h.flags, h.length),
            (chunk::NONE, chunk::FLAG_DONE, 0)
        );
        assert!(
            sent.remove(&h.cookie).is_some(),
            "unknown or repeated cookie {}",
            h.cookie
        );
    }
    // Pipelined reads with DF, answered as single OFFSET_DATA chunks.
    for i in 0..16u64 {
        c.request(cmd::READ, cmd_flag::DF, 2000 + i, i * 65536, 65536, &[]);
    }
    for _ in 0..16 {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        c.s.read_exact(&mut h).unwrap();
        let h = ChunkHeader::decode(&h).unwrap();
        assert_eq!((h.kind, h.flags), (chunk::OFFSET_DATA, chunk::FLAG_DONE));
        let mut payload = vec![0u8; h.length as usize];
        c.s.read_exact(&mut payload).unwrap();
        let offset = u64::from_be_bytes(payload[..8].try_into().unwrap());
        assert_eq!(offset, (h.cookie - 2000) * 65536);
        let o = usize::try_from(offset).unwrap();
        assert!(payload[8..] == model[o..o + 65536], "read at {offset}");
    }
    // An error as a structured ERROR chunk.
    c.request(cmd::READ, 0, 7, SIZE, 512, &[]);
    let mut h = [0u8; CHUNK_HEADER_LEN];
    c.s.read_exact(&mut h).unwrap();
    let h = ChunkHeader::decode(&h).unwrap();
    assert_eq!((h.kind, h.cookie), (chunk::ERROR, 7));
    let mut payload = vec![0u8; h.length as usize];
    c.s.read_exact(&mut payload).unwrap();
    assert_eq!(
        u32::from_be_bytes(payload[..4].try_into().unwrap()),
        err::EINVAL
    );
}
