//! Fixed-newstyle negotiation messages: greeting, client flags, options and option replies.

use super::codec::{DecodeError, MAX_STRING, Put, Reader};
use super::consts::{IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, info, rep};

/// Bytes of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option header (magic, code, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags.
    pub flags: u16,
}

impl Greeting {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(self.flags);
    }

    /// Parses the wire form.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        expect_magic(r.u64()?, NBDMAGIC)?;
        expect_magic(r.u64()?, IHAVEOPT)?;
        let flags = r.u16()?;
        r.finish()?;
        Ok(Greeting { flags })
    }
}

fn expect_magic(got: u64, want: u64) -> Result<(), DecodeError> {
    if got == want {
        Ok(())
    } else {
        Err(DecodeError::BadMagic { got, want })
    }
}

/// An option header; `len` bytes of option data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (any value: unknown codes are representable).
    pub code: u32,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(IHAVEOPT);
        out.put_u32(self.code);
        out.put_u32(self.len);
    }

    /// Parses the wire form.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        expect_magic(r.u64()?, IHAVEOPT)?;
        let code = r.u32()?;
        let len = r.u32()?;
        r.finish()?;
        Ok(OptionHeader { code, len })
    }
}

/// The data of `INFO` and `GO`: an export name and the information types asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (empty: the default export).
    pub name: String,
    /// Requested `NBD_INFO_*` types (any value).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_string32(&self.name);
        out.put_u16(u16::try_from(self.requests.len()).unwrap_or(u16::MAX));
        for r in &self.requests {
            out.put_u16(*r);
        }
    }

    /// Parses the wire form; the whole option data must be consumed.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let name = r.string32()?;
        let n = r.u16()?;
        let mut requests = Vec::with_capacity(usize::from(n).min(r.remaining() / 2));
        for _ in 0..n {
            requests.push(r.u16()?);
        }
        r.finish()?;
        Ok(InfoRequest { name, requests })
    }
}

/// The data of `LIST_META_CONTEXT` and `SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub name: String,
    /// Queries (e.g. `base:allocation`, or `base:` to list a namespace).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_string32(&self.name);
        out.put_u32(u32::try_from(self.queries.len()).unwrap_or(u32::MAX));
        for q in &self.queries {
            out.put_string32(q);
        }
    }

    /// Parses the wire form; the whole option data must be consumed.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let name = r.string32()?;
        let n = r.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(r.string32()?);
        }
        r.finish()?;
        Ok(MetaContextRequest { name, queries })
    }
}

/// An option reply header; `len` bytes of reply data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Length of the reply data.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u64(OPTION_REPLY_MAGIC);
        out.put_u32(self.option);
        out.put_u32(self.reply_type);
        out.put_u32(self.len);
    }

    /// Parses the wire form.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        expect_magic(r.u64()?, OPTION_REPLY_MAGIC)?;
        let option = r.u32()?;
        let reply_type = r.u32()?;
        let len = r.u32()?;
        r.finish()?;
        Ok(OptionReplyHeader {
            option,
            reply_type,
            len,
        })
    }
}

/// Appends a whole option reply: header and data.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    OptionReplyHeader {
        option,
        reply_type,
        len: u32::try_from(data.len()).unwrap_or(u32::MAX),
    }
    .encode(out);
    out.extend_from_slice(data);
}

/// Information about an export, as carried by `NBD_REP_INFO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        max: u32,
    },
    /// Another type, kept as bytes.
    Unknown {
        /// The type.
        kind: u16,
        /// Its data.
        data: Vec<u8>,
    },
}

impl Info {
    /// Appends the reply data (type and payload).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Info::Export { size, flags } => {
                out.put_u16(info::EXPORT);
                out.put_u64(*size);
                out.put_u16(*flags);
            }
            Info::Name(s) => {
                out.put_u16(info::NAME);
                out.extend_from_slice(s.as_bytes());
            }
            Info::Description(s) => {
                out.put_u16(info::DESCRIPTION);
                out.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                out.put_u16(info::BLOCK_SIZE);
                out.put_u32(*min);
                out.put_u32(*preferred);
                out.put_u32(*max);
            }
            Info::Unknown { kind, data } => {
                out.put_u16(*kind);
                out.extend_from_slice(data);
            }
        }
    }

    /// Parses reply data of an `NBD_REP_INFO`.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let kind = r.u16()?;
        let value = match kind {
            info::EXPORT => Info::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            info::NAME => Info::Name(r.string(r.remaining())?),
            info::DESCRIPTION => Info::Description(r.string(r.remaining())?),
            info::BLOCK_SIZE => Info::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            kind => Info::Unknown {
                kind,
                data: r.take(r.remaining())?.to_vec(),
            },
        };
        r.finish()?;
        Ok(value)
    }
}

/// `NBD_REP_SERVER` data for `LIST`: name and description.
pub fn server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.put_string32(name);
    out.extend_from_slice(description.as_bytes());
    out
}

/// `NBD_REP_META_CONTEXT` data: context id and name.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.put_u32(id);
    out.extend_from_slice(name.as_bytes());
    out
}

/// The reply to `EXPORT_NAME`: size, flags, and 124 zero bytes unless `NO_ZEROES` was agreed.
pub fn export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.put_u64(size);
    out.put_u16(flags);
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// Whether a reply type is an error.
pub fn is_error(reply_type: u32) -> bool {
    reply_type & (1 << 31) != 0
}

/// An error reply's message must be short and printable; this clamps it.
pub fn error_message(msg: &str) -> &[u8] {
    let bytes = msg.as_bytes();
    &bytes[..bytes.len().min(MAX_STRING)]
}

/// Every option reply type this server sends, for documentation and tests.
pub const REPLY_TYPES: [u32; 8] = [
    rep::ACK,
    rep::SERVER,
    rep::INFO,
    rep::META_CONTEXT,
    rep::ERR_UNSUP,
    rep::ERR_INVALID,
    rep::ERR_UNKNOWN,
    rep::ERR_TOO_BIG,
];
