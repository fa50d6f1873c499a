//! What goes wrong with an upstream, each error naming it, and how each becomes an I/O error
//! whose kind a caller can act on.

use std::io;

use super::target::BadUri;

/// What went wrong with an upstream; every variant names it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The URI cannot be used.
    #[error(transparent)]
    BadUri(#[from] BadUri),
    /// The socket failed.
    #[error("upstream {upstream}: {what}: {source}")]
    Io {
        /// The upstream's URI.
        upstream: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The server broke the protocol.
    #[error("upstream {upstream}: protocol error: {what}")]
    Protocol {
        /// The upstream's URI.
        upstream: String,
        /// What it did.
        what: String,
    },
    /// The server refused the export.
    #[error("upstream {upstream} refused export {export:?} (option reply {reply:#x}){}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Refused {
        /// The upstream's URI.
        upstream: String,
        /// The export asked for.
        export: String,
        /// The `NBD_REP_ERR_*` value.
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// The server answered a request with an error value.
    #[error("upstream {upstream}: {command} at {offset}+{length} failed with NBD error {errno}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Errno {
        /// The upstream's URI.
        upstream: String,
        /// The command.
        command: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u32,
        /// The NBD error value (errno numbering).
        errno: u32,
        /// The server's message (structured replies only).
        message: String,
    },
    /// The connection is gone.
    #[error("upstream {upstream}: connection lost ({why})")]
    Lost {
        /// The upstream's URI.
        upstream: String,
        /// Why.
        why: String,
    },
    /// The upstream stayed unreachable for the whole upstream timeout.
    #[error(
        "upstream {upstream}: unreachable for {seconds:.0} s (--upstream-timeout); last attempt: {last}"
    )]
    GaveUp {
        /// The upstream's URI.
        upstream: String,
        /// The timeout.
        seconds: f64,
        /// The last reconnection error.
        #[source]
        last: Box<UpstreamError>,
    },
    /// Requests kept failing on every new connection for the whole upstream timeout.
    #[error(
        "upstream {upstream}: the request kept failing for {seconds:.0} s (--upstream-timeout), on new connections too; last error: {last}"
    )]
    Failing {
        /// The upstream's URI.
        upstream: String,
        /// The timeout.
        seconds: f64,
        /// The last error.
        #[source]
        last: Box<UpstreamError>,
    },
    /// A FLUSH after a reconnect that may have lost acknowledged, unflushed writes.
    #[error(
        "upstream {upstream}: the connection was lost after writes that no flush covered; they may not be durable, so this flush fails"
    )]
    Unflushed {
        /// The upstream's URI.
        upstream: String,
    },
    /// TLS to the upstream cannot be set up.
    #[error("upstream {upstream}: TLS: {why}")]
    Tls {
        /// The upstream's URI.
        upstream: String,
        /// Why.
        why: String,
    },
    /// A request the upstream's block-size constraints rule out.
    #[error(
        "upstream {upstream}: {offset}+{length} is not aligned to its minimum block size {min}"
    )]
    Unaligned {
        /// The upstream's URI.
        upstream: String,
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// The minimum block size.
        min: u32,
    },
}

impl UpstreamError {
    /// Whether the connection itself failed (a new one may succeed), as opposed to the server
    /// answering with an error.
    pub fn connection_failed(&self) -> bool {
        matches!(
            self,
            UpstreamError::Io { .. } | UpstreamError::Lost { .. } | UpstreamError::Protocol { .. }
        )
    }
}

impl From<UpstreamError> for io::Error {
    /// An I/O error whose kind says what a caller can act on, with the upstream error (and
    /// so the upstream's name) as its source.
    fn from(e: UpstreamError) -> io::Error {
        let kind = match &e {
            UpstreamError::Io { source, .. } => source.kind(),
            UpstreamError::Errno { errno, .. } => {
                io::Error::from_raw_os_error(i32::try_from(*errno).unwrap_or(libc::EIO)).kind()
            }
            UpstreamError::Unaligned { .. } | UpstreamError::BadUri(_) => {
                io::ErrorKind::InvalidInput
            }
            UpstreamError::Lost { .. } => io::ErrorKind::NotConnected,
            UpstreamError::GaveUp { .. } | UpstreamError::Failing { .. } => io::ErrorKind::TimedOut,
            UpstreamError::Unflushed { .. } => io::ErrorKind::Other,
            UpstreamError::Protocol { .. } | UpstreamError::Refused { .. } => {
                io::ErrorKind::InvalidData
            }
            UpstreamError::Tls { .. } => io::ErrorKind::PermissionDenied,
        };
        io::Error::new(kind, e)
    }
}
