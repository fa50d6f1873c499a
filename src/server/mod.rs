//! The tokio edge: listener, connections, negotiation, transmission, shutdown.
//!
//! Shape (after mini-redis): the listener accepts under a connection-limit semaphore and spawns
//! one task per connection; each connection negotiates ([`negotiate`]), then serves pipelined
//! requests ([`transmit`]). A `watch` channel broadcasts shutdown: listeners stop accepting,
//! connections stop reading new requests, in-flight requests finish and are answered, and the
//! server flushes every volume before it returns.

pub mod buffers;
mod execute;
pub mod negotiate;
pub mod pipeline;
pub mod tls;
pub mod transmit;
pub mod validate;
pub mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};

use crate::volume::EncryptedVolume;

/// One named export.
#[derive(Debug)]
pub struct Export {
    /// Export name (what clients ask for).
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`, `LIST`).
    pub description: String,
    /// The encrypted volume behind it.
    pub volume: Arc<EncryptedVolume>,
    /// Turns true when the export is withdrawn (its volume was deleted): its connections end.
    pub retired: watch::Sender<bool>,
    /// Largest `READ`/`WRITE` payload served and advertised (`serve --max-request-mib`).
    pub max_request: u32,
    /// Per-request metrics, when the server exposes them (`serve --metrics-listen`).
    pub metrics: Option<Arc<crate::metrics::ExportMetrics>>,
}

impl Export {
    /// An export of `volume`.
    pub fn new(name: String, description: String, volume: EncryptedVolume) -> Self {
        Export {
            name,
            description,
            volume: Arc::new(volume),
            retired: watch::Sender::new(false),
            max_request: validate::DEFAULT_MAX_PAYLOAD,
            metrics: None,
        }
    }

    /// The same export with its requests counted in the process's metrics.
    #[must_use]
    pub fn with_metrics(mut self) -> Self {
        let (backend, sector) = (
            self.volume.backend_name(),
            self.volume.config().sector_size.bytes(),
        );
        self.metrics = Some(crate::metrics::global().export(
            &self.name,
            crate::volume::header::CIPHER,
            backend,
            sector as u64,
        ));
        self
    }

    /// The same export with another maximum request size.
    #[must_use]
    pub fn with_max_request(mut self, bytes: u32) -> Self {
        self.max_request = bytes;
        self
    }
}

/// The exports of a server; the first one is the default (empty name). Exports can be
/// withdrawn while the server runs.
#[derive(Debug, Clone, Default)]
pub struct Exports {
    list: Arc<std::sync::RwLock<Vec<Arc<Export>>>>,
}

impl Exports {
    /// Exports in the given order.
    pub fn new(list: Vec<Export>) -> Self {
        Exports {
            list: Arc::new(std::sync::RwLock::new(
                list.into_iter().map(Arc::new).collect(),
            )),
        }
    }

    fn snapshot(&self) -> Vec<Arc<Export>> {
        self.list.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The export called `name`; the empty name means the first export.
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        let list = self.snapshot();
        if name.is_empty() {
            return list.first().cloned();
        }
        list.iter().find(|e| e.name == name).cloned()
    }

    /// All exports (a snapshot).
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.snapshot()
    }

    /// Withdraws an export: new clients no longer see it, and its connections are told to end.
    /// Returns it, so the caller can wait for the last connection to let go of the volume.
    pub fn withdraw(&self, name: &str) -> Option<Arc<Export>> {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        let pos = list.iter().position(|e| e.name == name)?;
        let export = list.remove(pos);
        export.retired.send_replace(true);
        Some(export)
    }
}

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: Listen,
    /// Most simultaneous connections; more wait in the accept queue.
    pub max_connections: usize,
    /// Crypto workers and payload buffers, shared by every connection.
    pub resources: pipeline::Resources,
    /// Time a client has to finish negotiation (TLS handshake included) before it is
    /// disconnected.
    pub handshake_timeout: std::time::Duration,
    /// TLS credentials and mode; `None` serves plaintext only (`STARTTLS` gets `ERR_UNSUP`).
    pub tls: Option<Arc<tls::Tls>>,
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listener could not be set up.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// The address or path.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A bound listener, ready to serve.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket (the path is removed when the server stops).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds the configured address.
    pub async fn bind(listen: &Listen) -> Result<Self, ServerError> {
        match listen {
            Listen::Tcp(addr) => {
                TcpListener::bind(addr)
                    .await
                    .map(Listener::Tcp)
                    .map_err(|source| ServerError::Listen {
                        what: addr.to_string(),
                        source,
                    })
            }
            Listen::Unix(path) => {
                // A stale socket from a previous run would make bind fail.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    let _ = std::fs::remove_file(path);
                }
                UnixListener::bind(path)
                    .map(|l| Listener::Unix(l, path.clone()))
                    .map_err(|source| ServerError::Listen {
                        what: path.display().to_string(),
                        source,
                    })
            }
        }
    }

    /// The bound TCP address, if TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// The bound address, for logs (and port 0 in tests).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".into(), |a| format!("nbd://{a}")),
            Listener::Unix(_, p) => format!("nbd+unix:///?socket={}", p.display()),
        }
    }
}

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// Greeting, option haggling, and the TLS upgrade when the client asks for it. Returns the
/// session and the stream transmission runs on (the TLS stream after `STARTTLS`).
async fn negotiate_connection(
    mut stream: Box<dyn Conn>,
    id: u64,
    exports: &Exports,
    tls: Option<&tls::Tls>,
) -> Result<Option<(negotiate::Session, Box<dyn Conn>, bool)>, negotiate::NegotiateError> {
    use negotiate::{Outcome, TlsState};
    let no_zeroes = negotiate::greet(&mut stream).await?;
    let mut state = TlsState {
        offered: tls.is_some(),
        required: tls.is_some_and(tls::Tls::required),
        active: false,
    };
    loop {
        match negotiate::haggle(&mut stream, exports, no_zeroes, state).await? {
            Outcome::Session(session) => return Ok(Some((session, stream, state.active))),
            Outcome::Aborted => return Ok(None),
            Outcome::StartTls => {
                // `haggle` acknowledges STARTTLS only when TLS is offered and not yet active.
                let Some(tls) = tls.filter(|_| !state.active) else {
                    return Err(negotiate::NegotiateError::Protocol(
                        "STARTTLS acknowledged without TLS".into(),
                    ));
                };
                let upgraded = tls
                    .acceptor()
                    .accept(stream)
                    .await
                    .map_err(negotiate::NegotiateError::Tls)?;
                let (version, suite, client) = tls::describe(upgraded.get_ref().1);
                tracing::info!(
                    conn = id,
                    version,
                    suite,
                    client_cert_sha256 = client.as_deref().unwrap_or("none"),
                    "TLS established"
                );
                stream = Box::new(upgraded);
                state.active = true;
            }
        }
    }
}

async fn connection(
    stream: Box<dyn Conn>,
    peer: String,
    exports: Exports,
    resources: pipeline::Resources,
    handshake_timeout: std::time::Duration,
    tls: Option<Arc<tls::Tls>>,
    shutdown: watch::Receiver<bool>,
) {
    let id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed);
    tracing::info!(conn = id, %peer, "connection opened");
    // A client gets a bounded time to finish negotiating, TLS handshake included: a slow or
    // silent one (slow-loris) would otherwise hold one of the `--max-connections` slots forever.
    let negotiated = tokio::time::timeout(
        handshake_timeout,
        negotiate_connection(stream, id, &exports, tls.as_deref()),
    )
    .await;
    let metrics = crate::metrics::global();
    let Ok(negotiated) = negotiated else {
        metrics.handshake_failed("timeout");
        tracing::warn!(
            conn = id,
            %peer,
            timeout_s = handshake_timeout.as_secs_f64(),
            "connection closed: negotiation took too long"
        );
        return;
    };
    let (session, stream, tls_active) = match negotiated {
        Ok(Some(s)) => s,
        Ok(None) => {
            metrics.handshake_failed("aborted");
            tracing::info!(conn = id, "connection closed: client aborted negotiation");
            return;
        }
        Err(e @ (negotiate::NegotiateError::Tls(_) | negotiate::NegotiateError::TlsRequired)) => {
            metrics.handshake_failed(if matches!(e, negotiate::NegotiateError::Tls(_)) {
                "tls_handshake"
            } else {
                "tls_required"
            });
            tracing::warn!(conn = id, %peer, error = %e, "connection refused");
            return;
        }
        Err(e) => {
            metrics.handshake_failed(match e {
                negotiate::NegotiateError::Io(_) => "io",
                _ => "protocol",
            });
            tracing::info!(conn = id, error = %e, "connection closed during negotiation");
            return;
        }
    };
    let export = session.export.name.clone();
    let _open = metrics.connection_opened(tls_active);
    tracing::info!(
        conn = id,
        export,
        structured = session.structured,
        "transmission started"
    );
    let (end, stats) = transmit::serve(stream, session, resources, shutdown).await;
    let transmit::Stats {
        inline,
        workers,
        blocking,
        submitted,
    } = stats;
    let why = match &end {
        transmit::End::Clean => "client disconnected",
        transmit::End::Shutdown => "server shutting down",
        transmit::End::Retired => "the volume was deleted",
        transmit::End::Error(_) => "error",
    };
    match end {
        transmit::End::Error(e) => tracing::warn!(
            conn = id,
            export,
            error = %e,
            inline,
            workers,
            blocking,
            submitted,
            "connection dropped"
        ),
        _ => tracing::info!(
            conn = id,
            export,
            why,
            inline,
            workers,
            blocking,
            submitted,
            "connection closed"
        ),
    }
}

/// Serves `exports` on `listener` until `shutdown` turns true; then drains connections and
/// flushes every volume.
pub async fn run(
    listener: Listener,
    exports: Exports,
    config: &ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&limit).acquire_owned() => p,
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = permit else { break };
        let accepted: std::io::Result<(Box<dyn Conn>, String)> = tokio::select! {
            a = accept(&listener) => a,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let exports = exports.clone();
                let rx = shutdown.clone();
                let resources = config.resources.clone();
                let handshake_timeout = config.handshake_timeout;
                let tls = config.tls.clone();
                tasks.spawn(async move {
                    connection(stream, peer, exports, resources, handshake_timeout, tls, rx).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        // Reap finished connection tasks so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.try_join_next().is_some() {}
    tracing::info!(
        connections = tasks.len(),
        "shutting down: draining connections"
    );
    while tasks.join_next().await.is_some() {}
    for e in exports.all() {
        let v = Arc::clone(&e.volume);
        match tokio::task::spawn_blocking(move || v.flush()).await {
            Ok(Ok(())) => tracing::info!(export = e.name, "flushed"),
            Ok(Err(err)) => tracing::error!(export = e.name, error = %err, "final flush failed"),
            Err(err) => tracing::error!(export = e.name, error = %err, "final flush panicked"),
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

/// A connected socket of either kind.
pub trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

async fn accept(listener: &Listener) -> std::io::Result<(Box<dyn Conn>, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            // Replies are flushed in batches by the writer; Nagle would only add latency.
            s.set_nodelay(true)?;
            Ok((Box::new(s), a.to_string()))
        }
        Listener::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            Ok((Box::new(s), "unix".into()))
        }
    }
}
