//! TLS to an upstream (`nbds://HOST[:PORT]/EXPORT`, `nbds+unix:///EXPORT?socket=PATH`): the
//! client side of `NBD_OPT_STARTTLS`, on rustls (aws-lc-rs, TLS 1.3 and 1.2).
//!
//! Trust is process-wide, like a system trust store: `--upstream-tls-ca FILE` (the CA
//! certificates the upstream's certificate must chain to) and, optionally,
//! `--upstream-tls-cert`/`--upstream-tls-key` (a client certificate for upstreams that ask for
//! one) are read once at start ([`install`]) and used by every `nbds` connection. The
//! certificate must name the URI's host; for `nbds+unix` the name is `?tls-hostname=`, else
//! `localhost`.
//!
//! After the handshake one TLS session carries requests from many threads and replies to one
//! reader thread. The session sits behind a lock that is never held across a socket read or
//! write: a writer encrypts under the lock and sends the records under the socket's write lock
//! (taken first, so records leave in the order they were made); the reader receives raw bytes
//! without any lock and decrypts them under it.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::sock::Sock;

static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();

/// Why the upstream TLS settings cannot be used. Names the file, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read or parsed.
    #[error("upstream TLS {what} {path}: {reason}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The pieces do not fit together.
    #[error("upstream TLS: {0}")]
    Config(String),
}

/// Builds the client configuration from the CA file and an optional client certificate and key.
pub fn config(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let file_err = |what: &'static str, path: &Path| {
        let path = path.display().to_string();
        move |e: rustls::pki_types::pem::Error| TlsSetupError::File {
            what,
            path,
            reason: e.to_string(),
        }
    };
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(ca)
        .map_err(file_err("CA file", ca))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_err("CA file", ca))?;
    let (added, _) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(TlsSetupError::File {
            what: "CA file",
            path: ca.display().to_string(),
            reason: "holds no usable CA certificate".into(),
        });
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let cfg = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(file_err("client certificate", cert))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(file_err("client certificate", cert))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsSetupError::File {
                what: "client key",
                path: key.display().to_string(),
                // The parser's message names the PEM section, never its bytes.
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsSetupError::Config(format!("client certificate and key: {e}")))?
        }
    };
    Ok(Arc::new(cfg))
}

/// Makes `cfg` the configuration of every `nbds` connection of this process (first call wins).
pub fn install(cfg: Arc<ClientConfig>) {
    let _ = CONFIG.set(cfg);
}

/// The installed configuration, if any.
pub fn installed() -> Option<Arc<ClientConfig>> {
    CONFIG.get().cloned()
}

/// A new client session for `host`.
pub fn session(cfg: Arc<ClientConfig>, host: &str) -> Result<ClientConnection, String> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host:?} cannot be a TLS server name: {e}"))?;
    ClientConnection::new(cfg, name).map_err(|e| e.to_string())
}

/// One TLS session shared by the writers and the reply reader.
#[derive(Debug)]
struct Shared {
    conn: Mutex<ClientConnection>,
    /// The socket's sending side; taken before `conn`.
    out: Mutex<Sock>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Sends whatever records the session has queued. Caller holds `out`, not `conn`.
    fn send_queued(&self, out: &mut Sock) -> io::Result<()> {
        let records = {
            let mut conn = lock(&self.conn);
            let mut records = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut records)?;
            }
            records
        };
        out.write_all(&records)
    }
}

/// The sending half of an established session.
#[derive(Debug)]
pub(super) struct Writer(Arc<Shared>);

/// The receiving half of an established session.
#[derive(Debug)]
pub(super) struct Reader {
    shared: Arc<Shared>,
    sock: Sock,
    raw: Box<[u8]>,
}

/// Splits an established session over `sock` into its halves.
pub(super) fn split(conn: ClientConnection, sock: Sock) -> io::Result<(Writer, Reader)> {
    let read = sock.try_clone()?;
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        out: Mutex::new(sock),
    });
    Ok((
        Writer(Arc::clone(&shared)),
        Reader {
            shared,
            sock: read,
            // At most this much ciphertext is fed at once: its plaintext always fits the
            // session's received-plaintext buffer (16 KiB).
            raw: vec![0u8; 16 * 1024].into_boxed_slice(),
        },
    ))
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut out = lock(&self.0.out);
        let n = lock(&self.0.conn).writer().write_vectored(bufs)?;
        self.0.send_queued(&mut out)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match lock(&self.shared.conn).reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            let n = self.sock.read(&mut self.raw)?;
            let wants_write = {
                let mut conn = lock(&self.shared.conn);
                let mut fed = &self.raw[..n];
                loop {
                    // An empty slice tells the session that the peer closed.
                    conn.read_tls(&mut fed)?;
                    conn.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    if fed.is_empty() {
                        break;
                    }
                }
                conn.wants_write()
            };
            if wants_write {
                // A TLS 1.3 key update asks for an answer.
                let mut out = lock(&self.shared.out);
                self.shared.send_queued(&mut out)?;
            }
            if n == 0 {
                // Whatever plaintext remains, then a clean end or an error.
                return lock(&self.shared.conn).reader().read(buf).map_err(|e| {
                    if e.kind() == io::ErrorKind::WouldBlock {
                        io::ErrorKind::UnexpectedEof.into()
                    } else {
                        e
                    }
                });
            }
        }
    }
}
