//! TLS test helpers shared by tests/tls.rs and tests/tls_interop.rs: the test PKI and a server
//! started with TLS options.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use nbdcrypt::protocol::consts::{client_flags, opt, rep};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::{Server, TempDir, have, keyed_export, peer_available, run_ok};

/// The test PKI (see scripts/tls-certs.sh for what each file is).
pub fn pki(dir: &TempDir, name: &str) -> Option<PathBuf> {
    if !peer_available("openssl", have("openssl")) {
        return None;
    }
    let root = dir.path(name);
    run_ok(Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/tls-certs.sh")).arg(&root));
    Some(root)
}

pub fn tls_args(pki: &Path, client_ca: bool, required: bool) -> Vec<String> {
    let mut a = vec![
        "--tls-cert".into(),
        pki.join("server-cert.pem").display().to_string(),
        "--tls-key".into(),
        pki.join("server-key.pem").display().to_string(),
    ];
    if client_ca {
        a.push("--tls-client-ca".into());
        a.push(pki.join("ca-cert.pem").display().to_string());
    }
    if required {
        a.push("--tls-required".into());
    }
    a
}

pub fn start(dir: &TempDir, extra: &[String]) -> Server {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Server::start_with(dir, &[keyed_export(dir, "d", ",size=16M")], &extra)
}

// A rustls client driven byte by byte (tests/tls.rs, tests/disconnects.rs).

pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Connects, reads the greeting and sends the client flags: ready for options.
pub fn plaintext(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(client_flags::C_FIXED_NEWSTYLE | client_flags::C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s
}

pub fn send_option<S: Write>(s: &mut S, code: u32, data: &[u8]) {
    let mut b = Vec::new();
    nbdcrypt::protocol::OptionHeader {
        code,
        len: u32::try_from(data.len()).unwrap(),
    }
    .encode(&mut b);
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

/// One option reply: (option, reply type, data).
pub fn read_reply<S: Read>(s: &mut S) -> std::io::Result<(u32, u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        data,
    ))
}

pub fn go_data(export: &str) -> Vec<u8> {
    let mut d = u32::try_from(export.len()).unwrap().to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Sends GO and reads its replies up to the final one; returns that reply's type.
pub fn go<S: Read + Write>(s: &mut S, export: &str) -> std::io::Result<u32> {
    send_option(s, opt::GO, &go_data(export));
    loop {
        let (_, t, _) = read_reply(s)?;
        if t != rep::INFO {
            return Ok(t);
        }
    }
}

pub struct ClientOpts<'a> {
    /// CA the client trusts for the server.
    pub ca: &'a Path,
    /// Client certificate and key.
    pub cert: Option<(&'a Path, &'a Path)>,
    /// Only this version, or both.
    pub version: Option<&'static rustls::SupportedProtocolVersion>,
}

impl<'a> ClientOpts<'a> {
    /// Trusts `ca`, presents no certificate, offers TLS 1.3 and 1.2.
    pub fn trusting(ca: &'a Path) -> Self {
        ClientOpts {
            ca,
            cert: None,
            version: None,
        }
    }

    /// Presents this certificate (or none).
    pub fn with_cert(self, cert: Option<(&'a Path, &'a Path)>) -> Self {
        ClientOpts { cert, ..self }
    }

    /// Offers only this TLS version.
    pub fn only(self, version: &'static rustls::SupportedProtocolVersion) -> Self {
        ClientOpts {
            version: Some(version),
            ..self
        }
    }
}

pub fn client_config(o: &ClientOpts) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match o.version {
        Some(v) => vec![v],
        None => vec![&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(o.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match o.cert {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    })
}

pub type TlsClient = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// STARTTLS on a plaintext connection, then the TLS handshake (driven to completion).
pub fn starttls(mut s: TcpStream, o: &ClientOpts) -> std::io::Result<TlsClient> {
    send_option(&mut s, opt::STARTTLS, &[]);
    let (o_code, t, _) = read_reply(&mut s)?;
    assert_eq!(
        (o_code, t),
        (opt::STARTTLS, rep::ACK),
        "STARTTLS not acknowledged"
    );
    let conn =
        rustls::ClientConnection::new(client_config(o), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}
