//! Constants of the NBD protocol, named as in the spec (NetworkBlockDevice/nbd `doc/proto.md`),
//! without the `NBD_` prefix.

/// `"NBDMAGIC"`: the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: newstyle negotiation magic, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client, 16 bits).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client → server, 32 bits).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client wants no zero padding after `EXPORT_NAME`.
    pub const C_NO_ZEROES: u32 = 1 << 1;
}

/// Option codes.
pub mod opt {
    /// Select an export and end negotiation (old style: no error path).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation without transmission.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Withdrawn.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe and select an export.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// An export (reply to `LIST`).
    pub const SERVER: u32 = 2;
    /// Information about an export (reply to `INFO`/`GO`).
    pub const INFO: u32 = 3;
    /// A metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Option unknown.
    pub const ERR_UNSUP: u32 = ERR + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR + 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR + 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR + 4;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    /// Export unknown.
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    /// Block size information required.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR + 8;
    /// Request or reply too large.
    pub const ERR_TOO_BIG: u32 = ERR + 9;
    /// Extended headers required.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR + 10;
}

/// Information types in `INFO`/`GO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (per export, 16 bits).
pub mod flag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The `FUA` flag is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Seeks are expensive.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The `DF` flag is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see each other's writes once flushed.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `RESIZE` is supported.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// The `FAST_ZERO` flag is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command flags (per request, 16 bits).
pub mod cmd_flag {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES` must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `READ` must not fragment its reply.
    pub const DF: u16 = 1 << 2;
    /// `BLOCK_STATUS`: one extent is enough.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `WRITE_ZEROES`: fail fast rather than write slowly.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length is a payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
    /// Resize.
    pub const RESIZE: u16 = 8;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Last chunk of the reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Error values: the only ones allowed on the wire.
pub mod err {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status flags.
pub mod state {
    /// Unallocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The only metadata context nbdcrypt serves.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Name of an option code, for logs and docs.
pub fn option_name(code: u32) -> &'static str {
    match code {
        opt::EXPORT_NAME => "EXPORT_NAME",
        opt::ABORT => "ABORT",
        opt::LIST => "LIST",
        opt::PEEK_EXPORT => "PEEK_EXPORT",
        opt::STARTTLS => "STARTTLS",
        opt::INFO => "INFO",
        opt::GO => "GO",
        opt::STRUCTURED_REPLY => "STRUCTURED_REPLY",
        opt::LIST_META_CONTEXT => "LIST_META_CONTEXT",
        opt::SET_META_CONTEXT => "SET_META_CONTEXT",
        opt::EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

/// Name of a command type, for logs.
pub fn command_name(code: u16) -> &'static str {
    match code {
        cmd::READ => "READ",
        cmd::WRITE => "WRITE",
        cmd::DISC => "DISC",
        cmd::FLUSH => "FLUSH",
        cmd::TRIM => "TRIM",
        cmd::CACHE => "CACHE",
        cmd::WRITE_ZEROES => "WRITE_ZEROES",
        cmd::BLOCK_STATUS => "BLOCK_STATUS",
        cmd::RESIZE => "RESIZE",
        _ => "unknown",
    }
}
