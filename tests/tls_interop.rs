//! TLS against the real peers: `nbdinfo`/`nbdcopy` with `nbds://` and libnbd's
//! `tls-certificates`, and `qemu-io` with a `tls-creds-x509` object. The rustls-driven protocol
//! tests are in tests/tls.rs; the kernel `nbd-client` over TLS runs in the VM test
//! (scripts/vm-e2e.sh). A missing peer fails the test when `NBDCRYPT_REQUIRE_PEERS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::tls::{pki, start, tls_args};
use common::{TempDir, have, peer_available, run_ok};

#[test]
fn tls_nbdinfo_and_nbdcopy_with_libnbd_certificates() {
    if !peer_available("nbdinfo", have("nbdinfo")) || !peer_available("nbdcopy", have("nbdcopy")) {
        return;
    }
    let dir = TempDir::new("tls-libnbd");
    let Some(pki) = pki(&dir, "pki") else { return };
    let server = start(&dir, &tls_args(&pki, true, true));
    let uri = |sub: &str| {
        format!(
            "nbds://{}/d?tls-certificates={}",
            server.addr,
            pki.join(sub).display()
        )
    };
    let out = run_ok(Command::new("nbdinfo").arg(uri("client")));
    assert!(out.contains("with TLS"), "{out}");
    assert!(out.contains("export-size: 16777216"), "{out}");
    for (sub, what) in [("nocert", "no client certificate"), ("other", "another CA")] {
        let st = Command::new("nbdinfo").arg(uri(sub)).output().unwrap();
        assert!(!st.status.success(), "nbdinfo with {what} was served");
    }
    let st = Command::new("nbdinfo")
        .arg(format!("nbd://{}/d", server.addr))
        .output()
        .unwrap();
    assert!(!st.status.success(), "plaintext nbdinfo was served");

    // nbdcopy a file in and out over TLS.
    let src = dir.path("src.bin");
    let mut rng = common::Rng::new(common::seed("tls-nbdcopy"));
    std::fs::write(&src, rng.bytes(16 << 20)).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(uri("client")));
    let back = dir.path("back.bin");
    run_ok(Command::new("nbdcopy").arg(uri("client")).arg(&back));
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap());
    let log = server.stop();
    assert!(log.contains("TLS established"), "{log}");
    assert!(log.contains("peer sent no certificates"), "{log}");
    assert!(log.contains("TLS is required"), "{log}");
}

#[test]
fn tls_qemu_io_with_tls_creds_x509() {
    if !peer_available("qemu-io", have("qemu-io")) {
        return;
    }
    let dir = TempDir::new("tls-qemu");
    let Some(pki) = pki(&dir, "pki") else { return };
    let server = start(&dir, &tls_args(&pki, true, true));
    let (host, port) = server.addr.rsplit_once(':').unwrap();
    let qemu = |sub: &str, cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.arg("--object").arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            pki.join(sub).display()
        ));
        c.arg("--image-opts").arg(format!(
            "driver=nbd,server.type=inet,server.host={host},server.port={port},export=d,tls-creds=tls0"
        ));
        for x in cmds {
            c.arg("-c").arg(x);
        }
        c.output().unwrap()
    };
    let out = qemu(
        "client",
        &[
            "write -P 0x3c 0 1M",
            "write -P 0x4d 1000 5000",
            "flush",
            "read -P 0x3c 0 1000",
            "read -P 0x4d 1000 5000",
            "read -P 0x3c 6000 1042576",
        ],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert_eq!(text.matches("read ").count(), 3, "{text}");
    let out = qemu("other", &["read 0 4096"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || !text.contains("read 4096/4096"),
        "qemu-io with another CA's certificate was served: {text}"
    );
}

/// qemu 10 (GnuTLS) refuses a certificate whose key usage lacks keyEncipherment ("usage does
/// not permit key encipherment"); qemu 7.2 and rustls do not care. Every leaf certificate
/// scripts/tls-certs.sh makes must carry digitalSignature and keyEncipherment, and the right
/// extended key usage, so that users' certificates work with every client.
#[test]
fn tls_test_pki_has_the_key_usages_every_client_expects() {
    let dir = TempDir::new("tls-usage");
    let Some(pki) = pki(&dir, "pki") else { return };
    for (cert, eku) in [
        ("server-cert.pem", "TLS Web Server Authentication"),
        ("client-cert.pem", "TLS Web Client Authentication"),
        ("other/client-cert.pem", "TLS Web Client Authentication"),
    ] {
        let text = run_ok(
            Command::new("openssl")
                .args(["x509", "-noout", "-text", "-in"])
                .arg(pki.join(cert)),
        );
        assert!(
            text.contains("Digital Signature, Key Encipherment"),
            "{cert}: {text}"
        );
        assert!(text.contains(eku), "{cert}: {text}");
    }
}
