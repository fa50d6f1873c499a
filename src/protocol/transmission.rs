//! Transmission-phase messages: request headers, simple replies, structured reply chunks.

use super::codec::{DecodeError, Put, Reader};
use super::consts::{REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, chunk};

/// Bytes of a (compact) request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

fn expect_magic(r: &mut Reader<'_>, want: u32) -> Result<(), DecodeError> {
    let got = r.u32()?;
    if got == want {
        Ok(())
    } else {
        Err(DecodeError::BadMagic {
            got: got.into(),
            want: want.into(),
        })
    }
}

/// A request header. Any flags and command type are representable; validation is separate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque handle echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for `WRITE`, the payload that follows).
    pub length: u32,
}

impl Request {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// Parses the wire form.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        expect_magic(&mut r, REQUEST_MAGIC)?;
        let req = Request {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        };
        r.finish()?;
        Ok(req)
    }
}

/// A simple reply header; for a successful `READ`, the data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 or an `NBD_E*` value.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        out.put_u32(self.error);
        out.put_u64(self.cookie);
    }

    /// Parses the wire form.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        expect_magic(&mut r, SIMPLE_REPLY_MAGIC)?;
        let reply = SimpleReply {
            error: r.u32()?,
            cookie: r.u64()?,
        };
        r.finish()?;
        Ok(reply)
    }
}

/// A structured reply chunk header; `length` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Chunk flags (`DONE`).
    pub flags: u16,
    /// Chunk type.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length.
    pub length: u32,
}

impl ChunkHeader {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u32(self.length);
    }

    /// Parses the wire form.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        expect_magic(&mut r, STRUCTURED_REPLY_MAGIC)?;
        let h = ChunkHeader {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            length: r.u32()?,
        };
        r.finish()?;
        Ok(h)
    }
}

/// The header of an `OFFSET_DATA` chunk carrying `data_len` bytes read at `offset`; the payload
/// is the offset followed by the data, so the data can be sent without being copied here.
pub fn offset_data_header(out: &mut Vec<u8>, cookie: u64, offset: u64, data_len: u32, done: bool) {
    ChunkHeader {
        flags: if done { chunk::FLAG_DONE } else { 0 },
        kind: chunk::OFFSET_DATA,
        cookie,
        length: data_len.saturating_add(8),
    }
    .encode(out);
    out.put_u64(offset);
}

/// A complete `ERROR` chunk (always the last one of its reply).
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let msg_len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    ChunkHeader {
        flags: chunk::FLAG_DONE,
        kind: chunk::ERROR,
        cookie,
        length: 6 + u32::from(msg_len),
    }
    .encode(out);
    out.put_u32(error);
    out.put_u16(msg_len);
    out.extend_from_slice(&msg[..usize::from(msg_len)]);
}

/// A complete `NONE` chunk with `DONE`: success of a command without data.
pub fn none_chunk(out: &mut Vec<u8>, cookie: u64) {
    ChunkHeader {
        flags: chunk::FLAG_DONE,
        kind: chunk::NONE,
        cookie,
        length: 0,
    }
    .encode(out);
}

/// A complete `BLOCK_STATUS` chunk with `DONE`: `(length, flags)` descriptors for one context.
pub fn block_status_chunk(out: &mut Vec<u8>, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    let len = 4 + 8 * extents.len();
    ChunkHeader {
        flags: chunk::FLAG_DONE,
        kind: chunk::BLOCK_STATUS,
        cookie,
        length: u32::try_from(len).unwrap_or(u32::MAX),
    }
    .encode(out);
    out.put_u32(context);
    for (length, flags) in extents {
        out.put_u32(*length);
        out.put_u32(*flags);
    }
}
