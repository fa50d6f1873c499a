//! Fixed-newstyle negotiation as a client: the greeting and client flags, `STARTTLS` and the
//! handshake where the URI asks for TLS, then `STRUCTURED_REPLY`, `SET_META_CONTEXT` for
//! `base:allocation` (the upstream's holes, for block status), and `OPT_GO` with the export
//! name, asking for the block sizes.

use std::io::{Read, Write};
use std::time::Duration;

use super::UpstreamError;
use super::sock::Sock;
use super::target::Target;
use crate::protocol::consts::{BASE_ALLOCATION, client_flags, handshake_flags, info, opt, rep};
use crate::protocol::handshake::{GREETING_LEN, OPTION_REPLY_HEADER_LEN};
use crate::protocol::{
    Greeting, Info, InfoRequest, MetaContextRequest, OptionHeader, OptionReplyHeader,
};

/// The largest request payload when the server does not say (the spec's default).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Most bytes of option reply data read during negotiation.
pub(super) const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// How long connecting and negotiating may take.
pub(super) const NEGOTIATE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server said about the export in `OPT_GO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Minimum block size (requests are aligned to it).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Largest payload of one request.
    pub max_payload: u32,
    /// The id of the `base:allocation` context on this connection, when the server has it
    /// (then `BLOCK_STATUS` tells its holes).
    pub allocation: Option<u32>,
}

impl ExportInfo {
    /// Whether the server advertised `flag`.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// For `map_err`: an I/O error of the upstream `uri`, saying what was being done.
fn io_err<'a>(
    uri: &'a str,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> UpstreamError + 'a {
    move |source| UpstreamError::Io {
        upstream: uri.to_owned(),
        what,
        source,
    }
}

/// A protocol violation by the upstream `uri`.
fn protocol_err(uri: &str, what: String) -> UpstreamError {
    UpstreamError::Protocol {
        upstream: uri.to_owned(),
        what,
    }
}

/// Reads the greeting and sends the client flags (fixed newstyle).
pub(super) fn greet(sock: &mut Sock, target: &Target) -> Result<(), UpstreamError> {
    let uri = &target.uri;
    let io = |what| io_err(uri, what);
    let protocol = |what| protocol_err(uri, what);
    let mut g = [0u8; GREETING_LEN];
    sock.read_exact(&mut g)
        .map_err(io("no greeting (is it an NBD server?)"))?;
    let greeting =
        Greeting::decode(&g).map_err(|e| protocol(format!("not a newstyle NBD greeting: {e}")))?;
    if greeting.flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(protocol("the server does not speak fixed newstyle".into()));
    }
    let no_zeroes = greeting.flags & handshake_flags::NO_ZEROES != 0;
    let mut flags = client_flags::C_FIXED_NEWSTYLE;
    if no_zeroes {
        flags |= client_flags::C_NO_ZEROES;
    }
    sock.write_all(&flags.to_be_bytes())
        .map_err(io("cannot send the client flags"))
}

/// `NBD_OPT_STARTTLS`, then the TLS handshake with the installed configuration
/// (`--upstream-tls-ca`); the certificate must name `host`.
pub(super) fn start_tls(
    sock: &mut Sock,
    target: &Target,
    host: &str,
) -> Result<rustls::ClientConnection, UpstreamError> {
    let uri = &target.uri;
    let tls_err = |why: String| UpstreamError::Tls {
        upstream: uri.clone(),
        why,
    };
    let cfg = super::tls::installed().ok_or_else(|| {
        tls_err("nbds:// needs the CA its certificate chains to: --upstream-tls-ca FILE".into())
    })?;
    send_option(sock, opt::STARTTLS, &[]).map_err(io_err(uri, "cannot send an option"))?;
    let (reply, data) = option_reply(sock, opt::STARTTLS, uri)?;
    if reply != rep::ACK {
        return Err(tls_err(format!(
            "the upstream refused STARTTLS (option reply {reply:#x}{}); is TLS enabled there?",
            if data.is_empty() {
                String::new()
            } else {
                format!(": {}", error_text(&data))
            }
        )));
    }
    let mut conn = super::tls::session(cfg, host).map_err(&tls_err)?;
    while conn.is_handshaking() {
        conn.complete_io(sock)
            .map_err(|e| tls_err(format!("the TLS handshake failed: {e}")))?;
    }
    Ok(conn)
}

/// The option haggling after the greeting (over TLS where it was started): structured
/// replies, then `OPT_GO` with the block sizes.
pub(super) fn haggle<S: Read + Write>(
    sock: &mut S,
    target: &Target,
) -> Result<(ExportInfo, bool), UpstreamError> {
    let uri = &target.uri;
    let io = |what| io_err(uri, what);
    let protocol = |what| protocol_err(uri, what);
    send_option(sock, opt::STRUCTURED_REPLY, &[]).map_err(io("cannot send an option"))?;
    let (reply, data) = option_reply(sock, opt::STRUCTURED_REPLY, uri)?;
    let structured = match reply {
        rep::ACK => true,
        r if crate::protocol::handshake::is_error(r) => false,
        r => {
            return Err(protocol(format!(
                "unexpected reply {r:#x} ({} bytes) to STRUCTURED_REPLY",
                data.len()
            )));
        }
    };

    let allocation = if structured {
        set_allocation_context(sock, target)?
    } else {
        None
    };

    let mut go = Vec::new();
    InfoRequest {
        name: target.export.clone(),
        requests: vec![info::BLOCK_SIZE],
    }
    .encode(&mut go);
    send_option(sock, opt::GO, &go).map_err(io("cannot send an option"))?;
    let mut export = None;
    let mut block = None;
    loop {
        let (reply, data) = option_reply(sock, opt::GO, uri)?;
        match reply {
            rep::ACK => break,
            rep::INFO => match Info::decode(&data) {
                Ok(Info::Export { size, flags }) => export = Some((size, flags)),
                Ok(Info::BlockSize {
                    min,
                    preferred,
                    max,
                }) => block = Some((min, preferred, max)),
                Ok(_) => {}
                Err(e) => return Err(protocol(format!("a malformed INFO reply: {e}"))),
            },
            r if crate::protocol::handshake::is_error(r) => {
                let message = error_text(&data);
                return Err(UpstreamError::Refused {
                    upstream: uri.clone(),
                    export: target.export.clone(),
                    reply: r,
                    message,
                });
            }
            r => return Err(protocol(format!("unexpected reply {r:#x} to GO"))),
        }
    }
    let (size, flags) =
        export.ok_or_else(|| protocol("GO succeeded without NBD_INFO_EXPORT".into()))?;
    let (min, preferred, max) = block.unwrap_or((1, 4096, DEFAULT_MAX_PAYLOAD));
    if min == 0 || !min.is_power_of_two() || max < min {
        return Err(protocol(format!(
            "impossible block sizes: min {min}, preferred {preferred}, max {max}"
        )));
    }
    Ok((
        ExportInfo {
            size,
            flags,
            min_block: min,
            preferred_block: preferred,
            max_payload: max,
            allocation,
        },
        structured,
    ))
}

/// `SET_META_CONTEXT` for `base:allocation` on the export: its context id, or `None` when the
/// server does not offer it (an error reply, or no context in the answer). Block status is
/// advisory: a server without it is served as all data.
fn set_allocation_context<S: Read + Write>(
    sock: &mut S,
    target: &Target,
) -> Result<Option<u32>, UpstreamError> {
    let uri = &target.uri;
    let mut data = Vec::new();
    MetaContextRequest {
        name: target.export.clone(),
        queries: vec![BASE_ALLOCATION.into()],
    }
    .encode(&mut data);
    send_option(sock, opt::SET_META_CONTEXT, &data)
        .map_err(io_err(uri, "cannot send an option"))?;
    let mut id = None;
    loop {
        let (reply, data) = option_reply(sock, opt::SET_META_CONTEXT, uri)?;
        match reply {
            rep::ACK => return Ok(id),
            rep::META_CONTEXT if data.len() >= 4 => {
                let name = &data[4..];
                if name == BASE_ALLOCATION.as_bytes() {
                    id = Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
                }
            }
            r if crate::protocol::handshake::is_error(r) => return Ok(None),
            r => {
                return Err(protocol_err(
                    uri,
                    format!(
                        "unexpected reply {r:#x} ({} bytes) to SET_META_CONTEXT",
                        data.len()
                    ),
                ));
            }
        }
    }
}

fn send_option(sock: &mut impl Write, code: u32, data: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    OptionHeader {
        code,
        len: u32::try_from(data.len()).unwrap_or(u32::MAX),
    }
    .encode(&mut out);
    out.extend_from_slice(data);
    sock.write_all(&out)
}

fn option_reply(
    sock: &mut impl Read,
    option: u32,
    uri: &str,
) -> Result<(u32, Vec<u8>), UpstreamError> {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    sock.read_exact(&mut h)
        .map_err(io_err(uri, "no reply to an option"))?;
    let protocol = |what| protocol_err(uri, what);
    let reply = OptionReplyHeader::decode(&h)
        .map_err(|e| protocol(format!("a malformed option reply: {e}")))?;
    if reply.option != option {
        return Err(protocol(format!(
            "a reply to option {} while waiting for {option}",
            reply.option
        )));
    }
    if reply.len > MAX_OPTION_REPLY {
        return Err(protocol(format!("an option reply of {} bytes", reply.len)));
    }
    let mut data = vec![0u8; reply.len as usize];
    sock.read_exact(&mut data)
        .map_err(io_err(uri, "a truncated option reply"))?;
    Ok((reply.reply_type, data))
}

/// An option error's message, if it carries readable text.
fn error_text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).trim().to_owned()
}
