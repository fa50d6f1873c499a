//! A raw NBD client: fixed newstyle with `EXPORT_NAME`, simple replies, one request at a time
//! (or hand-built pipelines from [`raw_request`]).

/// A raw NBD connection to `export` (fixed newstyle, `NBD_OPT_EXPORT_NAME`, simple replies).
pub fn raw_connect(addr: &str, export: &str) -> std::net::TcpStream {
    use nbdcrypt::protocol::consts::{client_flags, opt};
    use nbdcrypt::protocol::handshake::OptionHeader;
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let mut b = (client_flags::C_FIXED_NEWSTYLE | client_flags::C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    OptionHeader {
        code: opt::EXPORT_NAME,
        len: u32::try_from(export.len()).unwrap(),
    }
    .encode(&mut b);
    b.extend_from_slice(export.as_bytes());
    s.write_all(&b).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    s
}

/// One request header on the wire.
pub fn raw_request(kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut b = Vec::new();
    nbdcrypt::protocol::Request {
        flags: 0,
        kind,
        cookie,
        offset,
        length,
    }
    .encode(&mut b);
    b
}

/// Reads one simple reply to `cookie` (which must have succeeded) and `data_len` bytes of data.
pub fn raw_reply<S: std::io::Read>(s: &mut S, cookie: u64, data_len: usize) -> Vec<u8> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[8..16], &cookie.to_be_bytes(), "reply to another request");
    assert_eq!(&h[4..8], &[0; 4], "request {cookie} failed");
    let mut d = vec![0u8; data_len];
    s.read_exact(&mut d).unwrap();
    d
}

/// `WRITE` of `data` at `offset` with command `flags`, waiting for its reply.
pub fn raw_write<S: std::io::Read + std::io::Write>(
    s: &mut S,
    cookie: u64,
    offset: u64,
    data: &[u8],
    flags: u16,
) {
    let mut b = raw_request(
        nbdcrypt::protocol::consts::cmd::WRITE,
        cookie,
        offset,
        u32::try_from(data.len()).unwrap(),
    );
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
    raw_reply(s, cookie, 0);
}

/// `READ` of `len` bytes at `offset`.
pub fn raw_read<S: std::io::Read + std::io::Write>(
    s: &mut S,
    cookie: u64,
    offset: u64,
    len: u32,
) -> Vec<u8> {
    s.write_all(&raw_request(
        nbdcrypt::protocol::consts::cmd::READ,
        cookie,
        offset,
        len,
    ))
    .unwrap();
    s.flush().unwrap();
    raw_reply(s, cookie, len as usize)
}

/// `FLUSH`, waiting for its reply.
pub fn raw_flush<S: std::io::Read + std::io::Write>(s: &mut S, cookie: u64) {
    s.write_all(&raw_request(
        nbdcrypt::protocol::consts::cmd::FLUSH,
        cookie,
        0,
        0,
    ))
    .unwrap();
    s.flush().unwrap();
    raw_reply(s, cookie, 0);
}
