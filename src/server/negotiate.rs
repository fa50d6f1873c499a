//! Fixed-newstyle negotiation: greeting, client flags, then options until `GO` or `EXPORT_NAME`.
//!
//! `STARTTLS` ends a round of option haggling: [`haggle`] acknowledges it and returns
//! [`Outcome::StartTls`]; the caller runs the TLS handshake on the same socket and calls
//! [`haggle`] again on the encrypted stream, with nothing carried over from the plaintext round
//! (the spec: option haggling starts afresh, without a new greeting). In TLS-required mode every
//! option but `STARTTLS` and `ABORT` is answered `NBD_REP_ERR_TLS_REQD` before TLS, and
//! `EXPORT_NAME`, which has no error reply, ends the connection.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Export, Exports};
use crate::protocol::consts::{BASE_ALLOCATION, client_flags, handshake_flags, info, opt, rep};
use crate::protocol::handshake::{self, OPTION_HEADER_LEN};
use crate::protocol::{Greeting, Info, InfoRequest, MetaContextRequest, OptionHeader};

/// Option data larger than this is discarded and answered with `ERR_TOO_BIG`.
const MAX_OPTION_DATA: u32 = 16 * 1024;
/// Option data larger than this is not even discarded: the client is disconnected.
const MAX_OPTION_SKIP: u32 = 1024 * 1024;
/// The one metadata context id we hand out.
pub const ALLOCATION_CONTEXT_ID: u32 = 1;

/// Why negotiation ended without transmission.
#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    /// The socket failed or closed.
    #[error("connection lost during negotiation: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol so that the session cannot continue.
    #[error("client protocol error: {0}")]
    Protocol(String),
    /// An option header that does not decode.
    #[error("client protocol error: {0}")]
    Decode(#[from] crate::protocol::DecodeError),
    /// The client sent `ABORT`.
    #[error("client aborted negotiation")]
    Aborted,
    /// The TLS handshake after `STARTTLS` failed (no or wrong client certificate, protocol
    /// mismatch, plaintext sent instead of a ClientHello, …).
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    /// The server requires TLS and the client asked for an export in plaintext with
    /// `EXPORT_NAME`, which has no error reply.
    #[error("TLS is required and the client sent EXPORT_NAME in plaintext")]
    TlsRequired,
}

/// What TLS allows in one round of option haggling.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsState {
    /// The server has credentials: `STARTTLS` is accepted.
    pub offered: bool,
    /// Plaintext clients get `ERR_TLS_REQD` for every option but `STARTTLS` and `ABORT`.
    pub required: bool,
    /// This round runs inside TLS.
    pub active: bool,
}

/// How a round of option haggling ended.
#[derive(Debug)]
pub enum Outcome {
    /// `GO` or `EXPORT_NAME` succeeded: transmission starts.
    Session(Session),
    /// The client sent `ABORT` (acknowledged).
    Aborted,
    /// `STARTTLS` was acknowledged: the next bytes are the client's TLS handshake.
    StartTls,
}

/// A negotiated session, ready for transmission.
#[derive(Debug)]
pub struct Session {
    /// The export.
    pub export: Arc<Export>,
    /// Structured replies are on.
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub block_status: bool,
}

struct State {
    structured: bool,
    /// Export name for which `base:allocation` was set, if any.
    meta_for: Option<String>,
    /// A plaintext option was already refused with `ERR_TLS_REQD` (logged once per round).
    refused_plaintext: bool,
}

async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    handshake::option_reply(&mut out, option, reply_type, data);
    s.write_all(&out).await
}

async fn error<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    reply_type: u32,
    msg: &str,
) -> std::io::Result<()> {
    reply(s, option, reply_type, handshake::error_message(msg)).await
}

/// Transmission flags of `export` given what is negotiated so far.
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    use crate::protocol::consts::flag;
    let cfg = export.volume.config();
    let mut f = flag::HAS_FLAGS
        | flag::SEND_FLUSH
        | flag::SEND_FUA
        | flag::CAN_MULTI_CONN
        | flag::SEND_CACHE;
    if cfg.read_only {
        f |= flag::READ_ONLY;
    } else {
        f |= flag::SEND_WRITE_ZEROES | flag::SEND_FAST_ZERO;
        if cfg.discards {
            f |= flag::SEND_TRIM;
        }
    }
    if structured {
        f |= flag::SEND_DF;
    }
    f
}

/// Sends the greeting and reads the client's flags. Returns whether the client set
/// `NBD_FLAG_C_NO_ZEROES`.
pub async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool, NegotiateError> {
    let mut out = Vec::new();
    Greeting {
        flags: handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
    }
    .encode(&mut out);
    s.write_all(&out).await?;
    let cflags = s.read_u32().await?;
    let known = client_flags::C_FIXED_NEWSTYLE | client_flags::C_NO_ZEROES;
    if cflags & !known != 0 || cflags & client_flags::C_FIXED_NEWSTYLE == 0 {
        return Err(NegotiateError::Protocol(format!(
            "unsupported client flags {cflags:#x} (fixed newstyle required)"
        )));
    }
    Ok(cflags & client_flags::C_NO_ZEROES != 0)
}

/// What an option handler decided.
enum Step {
    /// Read the next option.
    Next,
    /// Haggling is over.
    Done(Outcome),
}

/// One round of option haggling: the connection, what it may reach, and what it negotiated.
/// One handler per option (after mini-redis' one `apply` per command).
struct Haggle<'a, S> {
    s: &'a mut S,
    exports: &'a Exports,
    no_zeroes: bool,
    tls: TlsState,
    st: State,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Haggle<'_, S> {
    /// The next option and its data; `None` when it was too large and has been answered.
    async fn read_option(&mut self) -> Result<Option<(OptionHeader, Vec<u8>)>, NegotiateError> {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        self.s.read_exact(&mut hdr).await?;
        let h = OptionHeader::decode(&hdr)?;
        if h.len > MAX_OPTION_DATA {
            if h.len > MAX_OPTION_SKIP || h.code == opt::EXPORT_NAME {
                return Err(NegotiateError::Protocol(format!(
                    "option data of {} bytes",
                    h.len
                )));
            }
            let mut skip = (&mut *self.s).take(u64::from(h.len));
            tokio::io::copy(&mut skip, &mut tokio::io::sink()).await?;
            error(self.s, h.code, rep::ERR_TOO_BIG, "option data too large").await?;
            return Ok(None);
        }
        let mut data = vec![0u8; h.len as usize];
        self.s.read_exact(&mut data).await?;
        Ok(Some((h, data)))
    }

    /// With `--tls-required` and no TLS yet, every option but `STARTTLS` and `ABORT` is
    /// refused (`EXPORT_NAME` has no error reply: the connection ends). `true`: refused.
    async fn refuse_plaintext(&mut self, code: u32) -> Result<bool, NegotiateError> {
        if !self.tls.required || self.tls.active || code == opt::STARTTLS || code == opt::ABORT {
            return Ok(false);
        }
        if code == opt::EXPORT_NAME {
            return Err(NegotiateError::TlsRequired);
        }
        if !self.st.refused_plaintext {
            self.st.refused_plaintext = true;
            tracing::warn!(
                option = crate::protocol::consts::option_name(code),
                "plaintext client refused: TLS is required (NBD_REP_ERR_TLS_REQD)"
            );
        }
        error(
            self.s,
            code,
            rep::ERR_TLS_REQD,
            "TLS is required: send NBD_OPT_STARTTLS first",
        )
        .await?;
        Ok(true)
    }

    fn session(&self, export: Arc<Export>) -> Step {
        let block_status = self.st.meta_for.as_deref() == Some(export.name.as_str());
        Step::Done(Outcome::Session(Session {
            export,
            structured: self.st.structured,
            block_status,
        }))
    }

    async fn export_name(&mut self, data: &[u8]) -> Result<Step, NegotiateError> {
        let name = String::from_utf8_lossy(data);
        let Some(export) = self.exports.find(&name) else {
            // No error path exists for EXPORT_NAME: the spec says to close.
            return Err(NegotiateError::Protocol(format!("unknown export {name:?}")));
        };
        let mut out = Vec::new();
        handshake::export_name_reply(
            &mut out,
            export.volume.size(),
            transmission_flags(&export, self.st.structured),
            self.no_zeroes,
        );
        self.s.write_all(&out).await?;
        Ok(self.session(export))
    }

    async fn abort(&mut self, code: u32) -> Step {
        // Best effort: the client may already have closed.
        let _ = reply(self.s, code, rep::ACK, &[]).await;
        Step::Done(Outcome::Aborted)
    }

    async fn list(&mut self, code: u32, data: &[u8]) -> Result<Step, NegotiateError> {
        if !data.is_empty() {
            error(self.s, code, rep::ERR_INVALID, "LIST takes no data").await?;
            return Ok(Step::Next);
        }
        for e in self.exports.all() {
            let entry = handshake::server_entry(&e.name, &e.description);
            reply(self.s, code, rep::SERVER, &entry).await?;
        }
        reply(self.s, code, rep::ACK, &[]).await?;
        Ok(Step::Next)
    }

    async fn info_or_go(&mut self, code: u32, data: &[u8]) -> Result<Step, NegotiateError> {
        let Ok(req) = InfoRequest::decode(data) else {
            error(self.s, code, rep::ERR_INVALID, "malformed INFO/GO request").await?;
            return Ok(Step::Next);
        };
        let Some(export) = self.exports.find(&req.name) else {
            error(self.s, code, rep::ERR_UNKNOWN, "no such export").await?;
            return Ok(Step::Next);
        };
        let mut infos = vec![Info::Export {
            size: export.volume.size(),
            flags: transmission_flags(&export, self.st.structured),
        }];
        if req.requests.contains(&info::NAME) {
            infos.push(Info::Name(export.name.clone()));
        }
        if req.requests.contains(&info::DESCRIPTION) {
            infos.push(Info::Description(export.description.clone()));
        }
        // Block sizes say what the server accepts: any alignment (unaligned edges are
        // read-modify-written, as the kernel client needs), the sector size as the preferred
        // size (no read-modify-write then), and the largest request. A minimum above 1 would
        // make libnbd refuse smaller I/O client-side, so that nbdfuse + a 512-byte loop device
        // could not even read a superblock.
        infos.push(Info::BlockSize {
            min: 1,
            preferred: u32::try_from(export.volume.config().sector_size.bytes()).unwrap_or(4096),
            max: export.max_request,
        });
        for i in infos {
            let mut d = Vec::new();
            i.encode(&mut d);
            reply(self.s, code, rep::INFO, &d).await?;
        }
        reply(self.s, code, rep::ACK, &[]).await?;
        Ok(if code == opt::GO {
            self.session(export)
        } else {
            Step::Next
        })
    }

    async fn structured_reply(&mut self, code: u32, data: &[u8]) -> Result<Step, NegotiateError> {
        if data.is_empty() {
            self.st.structured = true;
            reply(self.s, code, rep::ACK, &[]).await?;
        } else {
            error(
                self.s,
                code,
                rep::ERR_INVALID,
                "STRUCTURED_REPLY takes no data",
            )
            .await?;
        }
        Ok(Step::Next)
    }

    async fn meta_context(&mut self, code: u32, data: &[u8]) -> Result<Step, NegotiateError> {
        let set = code == opt::SET_META_CONTEXT;
        if set && !self.st.structured {
            let msg = "structured replies are required first";
            error(self.s, code, rep::ERR_INVALID, msg).await?;
            return Ok(Step::Next);
        }
        let Ok(req) = MetaContextRequest::decode(data) else {
            let msg = "malformed meta context request";
            error(self.s, code, rep::ERR_INVALID, msg).await?;
            return Ok(Step::Next);
        };
        let Some(export) = self.exports.find(&req.name) else {
            error(self.s, code, rep::ERR_UNKNOWN, "no such export").await?;
            return Ok(Step::Next);
        };
        let available = export.volume.config().discards;
        let wants = |q: &str| q == BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()));
        let selected =
            available && ((!set && req.queries.is_empty()) || req.queries.iter().any(|q| wants(q)));
        if set {
            self.st.meta_for = selected.then(|| export.name.clone());
        }
        if selected {
            let id = if set { ALLOCATION_CONTEXT_ID } else { 0 };
            let ctx = handshake::meta_context(id, BASE_ALLOCATION);
            reply(self.s, code, rep::META_CONTEXT, &ctx).await?;
        }
        reply(self.s, code, rep::ACK, &[]).await?;
        Ok(Step::Next)
    }

    async fn starttls(&mut self, code: u32, data: &[u8]) -> Result<Step, NegotiateError> {
        let refusal = if !data.is_empty() {
            Some((rep::ERR_INVALID, "STARTTLS takes no data"))
        } else if !self.tls.offered {
            Some((rep::ERR_UNSUP, "TLS is not configured on this server"))
        } else if self.tls.active {
            Some((rep::ERR_INVALID, "TLS is already active"))
        } else {
            None
        };
        match refusal {
            Some((kind, msg)) => {
                error(self.s, code, kind, msg).await?;
                Ok(Step::Next)
            }
            None => {
                reply(self.s, code, rep::ACK, &[]).await?;
                Ok(Step::Done(Outcome::StartTls))
            }
        }
    }
}

/// One round of option haggling on `s`, until transmission, `ABORT` or `STARTTLS`.
pub async fn haggle<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    exports: &Exports,
    no_zeroes: bool,
    tls: TlsState,
) -> Result<Outcome, NegotiateError> {
    let mut h = Haggle {
        s,
        exports,
        no_zeroes,
        tls,
        st: State {
            structured: false,
            meta_for: None,
            refused_plaintext: false,
        },
    };
    loop {
        let Some((hdr, data)) = h.read_option().await? else {
            continue;
        };
        if h.refuse_plaintext(hdr.code).await? {
            continue;
        }
        let step = match hdr.code {
            opt::EXPORT_NAME => h.export_name(&data).await?,
            opt::ABORT => h.abort(hdr.code).await,
            opt::LIST => h.list(hdr.code, &data).await?,
            opt::INFO | opt::GO => h.info_or_go(hdr.code, &data).await?,
            opt::STRUCTURED_REPLY => h.structured_reply(hdr.code, &data).await?,
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                h.meta_context(hdr.code, &data).await?
            }
            opt::STARTTLS => h.starttls(hdr.code, &data).await?,
            _ => {
                error(h.s, hdr.code, rep::ERR_UNSUP, "option not supported").await?;
                Step::Next
            }
        };
        if let Step::Done(outcome) = step {
            return Ok(outcome);
        }
    }
}
