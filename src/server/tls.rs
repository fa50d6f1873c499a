//! TLS in transit: the server's X.509 credentials, the client-certificate policy, and their
//! reload on SIGHUP.
//!
//! NBD upgrades a plaintext connection with `NBD_OPT_STARTTLS` ([`super::negotiate`]); this
//! module only owns the rustls configuration that upgrade uses. TLS 1.3 and 1.2 are offered
//! (aws-lc-rs provider, rustls' default cipher suites: AEADs with forward secrecy only). With a
//! client CA, a client must present a certificate that chains to it: that is access control, so
//! it implies TLS-required mode (a plaintext client would otherwise walk around it).
//!
//! Reload: [`Tls::reload`] reads every file again and swaps the configuration in atomically;
//! handshakes already under way and established sessions keep the old one, and a reload that
//! fails leaves the old configuration in place. The private key is never logged or put in an
//! error; only paths and the reason are.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Where the credentials are, as given on the command line.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, server certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to, if clients must present one.
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS configuration could not be built. Names the file and the reason, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed as PEM.
    #[error("TLS {what} {path}: {source}")]
    File {
        /// Which file ("certificate", "private key", "client CA").
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: TlsCause,
    },
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("TLS configuration from {cert} and {key}: {source}")]
    Config {
        /// Certificate path.
        cert: PathBuf,
        /// Key path.
        key: PathBuf,
        /// Why.
        source: TlsCause,
    },
}

/// The cause of a [`TlsError`], kept with its source.
#[derive(Debug, thiserror::Error)]
pub enum TlsCause {
    /// The PEM file (structure: missing section, bad base64; never its contents).
    #[error(transparent)]
    Pem(#[from] rustls::pki_types::pem::Error),
    /// rustls refused.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error(transparent)]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The file parsed but holds nothing usable.
    #[error("{0}")]
    Missing(&'static str),
}

/// The server's TLS state: the mode and the current rustls configuration.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    required: bool,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |source: TlsCause| TlsError::File {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.into()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.into()))?;
    if certs.is_empty() {
        return Err(err(TlsCause::Missing(
            "no PEM CERTIFICATE block in the file",
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    warn_if_readable_by_others(path);
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "private key",
        path: path.to_owned(),
        // pem errors describe structure (missing section, bad base64), never the contents.
        source: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                TlsCause::Missing("no PEM PRIVATE KEY block in the file")
            }
            other => other.into(),
        },
    })
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o044 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", m.permissions().mode() & 0o777),
            "the TLS private key is readable by other users; chmod 600 it"
        );
    }
}

fn build(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let chain = read_certs("certificate", &files.cert)?;
    let key = read_key(&files.key)?;
    let config_err = |source: rustls::Error| TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source: source.into(),
    };
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(config_err)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs("client CA", ca)? {
                roots.add(c).map_err(|e| TlsError::File {
                    what: "client CA",
                    path: ca.clone(),
                    source: e.into(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::File {
                    what: "client CA",
                    path: ca.clone(),
                    source: e.into(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(config_err)?;
    // Session tickets/resumption would keep ticket keys around; NBD sessions are long-lived
    // and reconnect rarely, so a full handshake costs nothing that matters.
    config.send_tls13_tickets = 0;
    Ok(config)
}

impl Tls {
    /// Loads the credentials. `required` refuses every option but `STARTTLS` and `ABORT` before
    /// TLS; a client CA makes TLS required whatever `required` says.
    pub fn load(files: TlsFiles, required: bool) -> Result<Self, TlsError> {
        let config = build(&files)?;
        let required = required || files.client_ca.is_some();
        Ok(Tls {
            files,
            required,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again and, if they make a valid configuration, uses it for every new
    /// handshake. On error the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(build(&self.files)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// Plaintext clients are refused.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Clients must present a certificate from the client CA.
    pub fn verifies_clients(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The files in use (for logs).
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()));
        tokio_rustls::TlsAcceptor::from(config)
    }
}

/// What a finished handshake tells the log: protocol version, cipher suite, and the SHA-256
/// fingerprint of the client's certificate when it sent one.
pub fn describe(conn: &rustls::ServerConnection) -> (String, String, Option<String>) {
    let version = conn
        .protocol_version()
        .map_or_else(|| "?".into(), |v| format!("{v:?}"));
    let suite = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "?".into(), |s| format!("{:?}", s.suite()));
    let client = conn.peer_certificates().and_then(|c| c.first()).map(|c| {
        crate::codec::to_hex(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, c.as_ref()).as_ref(),
        )
    });
    (version, suite, client)
}
