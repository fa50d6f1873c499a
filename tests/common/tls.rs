//! TLS test helpers shared by tests/tls.rs and tests/tls_interop.rs: the test PKI and a server
//! started with TLS options.

use std::path::{Path, PathBuf};
use std::process::Command;

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
