//! TLS in transit (`NBD_OPT_STARTTLS`): a rustls client driven byte by byte (TLS 1.2 and 1.3,
//! with and without client certificates, refusals, option haggling afresh after the upgrade,
//! SIGHUP reload, the handshake timeout, a snooped wire). The real peers are in
//! tests/tls_interop.rs; the kernel `nbd-client` over TLS runs in the VM test
//! (scripts/vm-e2e.sh).
//!
//! The PKI comes from `scripts/tls-certs.sh` (openssl); a missing peer fails the test when
//! `NBDCRYPT_REQUIRE_PEERS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::tls::{
    ClientOpts, TlsClient, go, go_data, pki, plaintext, read_reply, send_option, start, starttls,
    tls_args,
};
use common::{Server, TempDir, keyed_export, raw_read, raw_write, run_ok};
use nbdcrypt::protocol::consts::{cmd_flag, opt, rep};

/// Writes `data` at offset 0 with FUA, waits for the reply, and reads it back (simple replies).
fn write_read<S: Read + Write>(s: &mut S, data: &[u8]) -> Vec<u8> {
    raw_write(s, 1, 0, data, cmd_flag::FUA);
    raw_read(s, 2, 0, u32::try_from(data.len()).unwrap())
}

/// A full attach over TLS: STARTTLS, GO, a FUA write and a read. `Err` if anything refused it.
fn attach(addr: &str, o: &ClientOpts) -> std::io::Result<(TlsClient, Vec<u8>)> {
    let mut tls = starttls(plaintext(addr), o)?;
    let t = go(&mut tls, "d")?;
    if t != rep::ACK {
        return Err(std::io::Error::other(format!("GO answered {t:#x}")));
    }
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    let back = write_read(&mut tls, &data);
    assert_eq!(back, data, "data over TLS did not read back");
    Ok((tls, data))
}

fn good_client(pki: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        pki.join("ca-cert.pem"),
        pki.join("client-cert.pem"),
        pki.join("client-key.pem"),
    )
}

#[test]
fn tls_1_2_and_1_3_each_negotiate_and_carry_data() {
    let dir = TempDir::new("tls-versions");
    let Some(pki) = pki(&dir, "pki") else { return };
    let server = start(&dir, &tls_args(&pki, false, true));
    let ca = pki.join("ca-cert.pem");
    for (version, name) in [
        (&rustls::version::TLS13, "TLSv1_3"),
        (&rustls::version::TLS12, "TLSv1_2"),
    ] {
        let (tls, _) = attach(&server.addr, &ClientOpts::trusting(&ca).only(version))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            tls.conn.protocol_version(),
            Some(version.version),
            "{name} was not the version used"
        );
        drop(tls);
        let log = server.wait_for_log(&format!("version=\"{name}\""));
        assert!(log.contains(&format!("version=\"{name}\"")), "{log}");
    }
    let log = server.stop();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn tls_required_refuses_plaintext_options_then_accepts_starttls_on_the_same_connection() {
    let dir = TempDir::new("tls-required");
    let Some(pki) = pki(&dir, "pki") else { return };
    let server = start(&dir, &tls_args(&pki, false, true));
    let mut s = plaintext(&server.addr);
    for code in [opt::GO, opt::INFO, opt::LIST, opt::STRUCTURED_REPLY, 1234] {
        let data = if code == opt::GO || code == opt::INFO {
            go_data("d")
        } else {
            Vec::new()
        };
        send_option(&mut s, code, &data);
        let (o, t, _) = read_reply(&mut s).unwrap();
        assert_eq!((o, t), (code, rep::ERR_TLS_REQD), "option {code}");
    }
    // STARTTLS with data is invalid, but does not end the connection.
    send_option(&mut s, opt::STARTTLS, b"x");
    assert_eq!(read_reply(&mut s).unwrap().1, rep::ERR_INVALID);
    let ca = pki.join("ca-cert.pem");
    let o = ClientOpts::trusting(&ca);
    let mut tls = starttls(s, &o).unwrap();
    // Haggling starts afresh inside TLS: a second STARTTLS is invalid, GO works.
    send_option(&mut tls, opt::STARTTLS, &[]);
    assert_eq!(read_reply(&mut tls).unwrap().1, rep::ERR_INVALID);
    assert_eq!(go(&mut tls, "d").unwrap(), rep::ACK);
    let data = vec![0x5a; 4096];
    assert_eq!(write_read(&mut tls, &data), data);
    drop(tls);

    // EXPORT_NAME has no error reply: in plaintext it ends the connection.
    let mut s = plaintext(&server.addr);
    send_option(&mut s, opt::EXPORT_NAME, b"d");
    let mut b = [0u8; 1];
    assert!(
        matches!(s.read(&mut b), Ok(0) | Err(_)),
        "EXPORT_NAME served"
    );
    let log = server.wait_for_log("EXPORT_NAME in plaintext");
    assert!(
        log.contains("plaintext client refused: TLS is required"),
        "{log}"
    );
    assert!(
        log.contains("connection refused") && log.contains("EXPORT_NAME in plaintext"),
        "{log}"
    );
    // The server still serves TLS clients after all that.
    attach(&server.addr, &o).unwrap();
}

#[test]
fn tls_selective_serves_plaintext_and_tls_and_unsupported_without_credentials() {
    let dir = TempDir::new("tls-selective");
    let Some(pki) = pki(&dir, "pki") else { return };
    let server = start(&dir, &tls_args(&pki, false, false));
    let mut s = plaintext(&server.addr);
    assert_eq!(go(&mut s, "d").unwrap(), rep::ACK);
    let data = vec![0xa5; 4096];
    assert_eq!(write_read(&mut s, &data), data);
    drop(s);
    let ca = pki.join("ca-cert.pem");
    attach(&server.addr, &ClientOpts::trusting(&ca)).unwrap();
    drop(server);

    // Without --tls-cert, STARTTLS is unsupported and plaintext continues.
    let plain = TempDir::new("tls-off");
    let server = Server::start(&plain, &[keyed_export(&plain, "d", ",size=16M")]);
    let mut s = plaintext(&server.addr);
    send_option(&mut s, opt::STARTTLS, &[]);
    assert_eq!(read_reply(&mut s).unwrap().1, rep::ERR_UNSUP);
    assert_eq!(go(&mut s, "d").unwrap(), rep::ACK);
}

#[test]
fn tls_client_ca_refuses_missing_or_foreign_certificates_and_keeps_serving() {
    let dir = TempDir::new("tls-client-ca");
    let Some(pki) = pki(&dir, "pki") else { return };
    // --tls-client-ca alone: implies TLS required.
    let server = start(&dir, &tls_args(&pki, true, false));
    let (ca, good_cert, good_key) = good_client(&pki);
    let other_cert = pki.join("other/client-cert.pem");
    let other_key = pki.join("other/client-key.pem");
    for (what, cert, reason) in [
        ("no certificate", None, "peer sent no certificates"),
        (
            "a certificate from another CA",
            Some((other_cert.as_path(), other_key.as_path())),
            "invalid peer certificate",
        ),
    ] {
        let before = std::fs::read_to_string(&server.log)
            .unwrap()
            .matches(reason)
            .count();
        let r = attach(&server.addr, &ClientOpts::trusting(&ca).with_cert(cert));
        assert!(r.is_err(), "a client with {what} was served");
        let log = server.wait_for_log(reason);
        assert_eq!(log.matches(reason).count(), before + 1, "{what}:\n{log}");
        assert!(log.contains("connection refused"), "{log}");
        // A client with the right certificate is served right after.
        attach(
            &server.addr,
            &ClientOpts::trusting(&ca).with_cert(Some((&good_cert, &good_key))),
        )
        .unwrap_or_else(|e| panic!("after refusing {what}: {e}"));
    }
    // Plaintext is refused too.
    let mut s = plaintext(&server.addr);
    assert_eq!(go(&mut s, "d").unwrap(), rep::ERR_TLS_REQD);
    // A client that sends plaintext after STARTTLS instead of a ClientHello.
    let mut s = plaintext(&server.addr);
    send_option(&mut s, opt::STARTTLS, &[]);
    assert_eq!(read_reply(&mut s).unwrap().1, rep::ACK);
    send_option(&mut s, opt::GO, &go_data("d"));
    let mut b = [0u8; 64];
    let n = s.read(&mut b).unwrap_or(0);
    assert!(
        n == 0 || b[0] == 0x15,
        "expected a TLS alert or a close, got {:?}",
        &b[..n]
    );
    let log = server.wait_for_log("TLS handshake failed: received corrupt message");
    assert!(log.contains("TLS handshake failed"), "{log}");
    // The client's certificate fingerprint is logged, so access can be audited.
    assert!(log.contains("client_cert_sha256=\""), "{log}");
    let log = server.stop();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn tls_sighup_reloads_certificates_for_new_clients_and_keeps_established_sessions() {
    let dir = TempDir::new("tls-reload");
    let Some(pki) = pki(&dir, "pki") else { return };
    let Some(next) = self::pki(&dir, "pki2") else {
        return;
    };
    // The server reads copies, which the test replaces.
    let live = dir.path("live");
    std::fs::create_dir_all(&live).unwrap();
    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.join(f), live.join(f)).unwrap();
    }
    let server = start(&dir, &tls_args(&live, false, true));
    let old_ca = pki.join("ca-cert.pem");
    let new_ca = next.join("ca-cert.pem");
    let old = ClientOpts::trusting(&old_ca);
    let new = ClientOpts::trusting(&new_ca);
    let (mut established, data) = attach(&server.addr, &old).unwrap();
    assert!(attach(&server.addr, &new).is_err(), "new CA trusted early");

    let hup = |server: &Server| {
        run_ok(
            Command::new("kill")
                .arg("-HUP")
                .arg(server.child.id().to_string()),
        );
    };
    // A broken reload keeps the old certificate.
    std::fs::write(live.join("server-key.pem"), "not a key\n").unwrap();
    hup(&server);
    let log = server.wait_for_log("TLS reload failed");
    assert!(log.contains("TLS reload failed"), "{log}");
    attach(&server.addr, &old).expect("the old certificate stopped working");

    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(next.join(f), live.join(f)).unwrap();
    }
    hup(&server);
    let log = server.wait_for_log("TLS certificates reloaded");
    assert!(log.contains("TLS certificates reloaded"), "{log}");
    attach(&server.addr, &new).expect("the reloaded certificate is not used");
    assert!(
        attach(&server.addr, &old).is_err(),
        "the old certificate is still served"
    );
    // The session established before both reloads still works.
    assert_eq!(write_read(&mut established, &data), data);
    assert!(server.child.id() > 0);
    let log = server.stop();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn tls_handshake_counts_against_the_handshake_timeout() {
    let dir = TempDir::new("tls-timeout");
    let Some(pki) = pki(&dir, "pki") else { return };
    let mut args = tls_args(&pki, false, true);
    args.extend(["--handshake-timeout".into(), "1".into()]);
    let server = start(&dir, &args);
    let mut s = plaintext(&server.addr);
    send_option(&mut s, opt::STARTTLS, &[]);
    assert_eq!(read_reply(&mut s).unwrap().1, rep::ACK);
    // No ClientHello: the server must drop the connection.
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    let log = server.wait_for_log("negotiation took too long");
    assert!(log.contains("negotiation took too long"), "{log}");
}

#[test]
fn tls_a_snooped_connection_shows_no_plaintext_data() {
    let dir = TempDir::new("tls-snoop");
    let Some(pki) = pki(&dir, "pki") else { return };
    // Selective: the same server carries a plaintext control run.
    let server = start(&dir, &tls_args(&pki, false, false));
    let pattern: Vec<u8> = b"NBDCRYPT-IN-TRANSIT-"
        .iter()
        .copied()
        .cycle()
        .take(8192)
        .collect();
    let marker = b"NBDCRYPT-IN-TRANSIT-NBDCRYPT";

    let addr = format!("127.0.0.1:{}", common::free_port());
    let seen = common::tcp_forward(addr.clone(), server.addr.clone(), Duration::ZERO);
    let mut s = plaintext(&addr);
    assert_eq!(go(&mut s, "d").unwrap(), rep::ACK);
    assert_eq!(write_read(&mut s, &pattern), pattern);
    drop(s);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let control = seen.lock().unwrap().clone();
    assert!(
        control.windows(marker.len()).any(|w| w == marker),
        "the plaintext control run does not show the data: the check would prove nothing"
    );

    let addr = format!("127.0.0.1:{}", common::free_port());
    let seen = common::tcp_forward(addr.clone(), server.addr.clone(), Duration::ZERO);
    let ca = pki.join("ca-cert.pem");
    let mut tls = starttls(plaintext(&addr), &ClientOpts::trusting(&ca)).unwrap();
    assert_eq!(go(&mut tls, "d").unwrap(), rep::ACK);
    assert_eq!(write_read(&mut tls, &pattern), pattern);
    drop(tls);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let wire = seen.lock().unwrap().clone();
    assert!(
        wire.len() > 2 * pattern.len(),
        "too little traffic recorded"
    );
    assert!(
        !wire.windows(marker.len()).any(|w| w == marker),
        "data crossed the wire in plaintext inside TLS"
    );
}
