//! The AWS KMS path (`aws-sdk-kms`) against moto on loopback: the scratch lifecycle with
//! `--kms aws --kms-endpoint http://127.0.0.1:PORT` and static test credentials; the NBD data
//! reads back intact across a restart, and delete shreds the key. moto does not enforce key
//! states or policies (FACTS.md): those semantics are tested on the local KMS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::moto::{AWS_ENV, aws_cli, moto};
use common::{Server, TempDir, have, peer_available, run_ok};

#[test]
fn aws_kms_scratch_lifecycle_against_moto() {
    let Some(moto) = moto() else { return };
    if !peer_available("qemu-io", have("qemu-io")) {
        return;
    }
    let dir = TempDir::new("aws");
    let state = dir.path("state");
    let cli = || aws_cli(&state, &moto.url);
    run_ok(cli().args(["volume", "create", "cloud", "--size", "16M"]));
    let mut env: Vec<(&str, &str)> = AWS_ENV.to_vec();
    let state_s = state.to_str().unwrap().to_owned();
    env.push(("NBDCRYPT_STATE_DIR", &state_s));
    env.push(("NBDCRYPT_KMS", "aws"));
    env.push(("NBDCRYPT_KMS_ENDPOINT", &moto.url));
    let serve = || Server::try_start(&dir, &[], &["--volume", "cloud"], &env);
    let server = serve().unwrap();
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x0a 512k 1M"])
            .arg(server.uri("cloud")),
    );
    drop(server.stop());
    let server = serve().unwrap();
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x0a 512k 1M"])
            .arg(server.uri("cloud")),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    drop(server.stop());

    let audit = std::fs::read_to_string(state.join("audit.log")).unwrap();
    let decrypts = audit
        .lines()
        .filter(|l| {
            l.contains("\"operation\":\"Decrypt\"")
                && l.contains("\"success\"")
                && !l.contains("\"purpose\"")
        })
        .count();
    assert_eq!(decrypts, 2, "one Decrypt per serve:\n{audit}");
    // Creation checked once that the new wrapped key unwraps before writing the header.
    assert_eq!(
        audit.matches("\"purpose\":\"verify-wrap\"").count(),
        1,
        "{audit}"
    );
    assert!(
        audit.contains("\"operation\":\"GenerateDataKey\""),
        "{audit}"
    );

    run_ok(cli().args(["volume", "delete", "cloud"]));
    let err = serve().err().expect("a deleted volume must not serve");
    assert!(err.contains("was deleted"), "{err}");
}

#[test]
fn aws_kms_unreachable_retries_with_backoff_then_fails_naming_key_and_operation() {
    let dir = TempDir::new("aws-down");
    let endpoint = format!("http://127.0.0.1:{}", common::free_port());
    let mut c = aws_cli(&dir.path("state"), &endpoint);
    c.args([
        "--kms-attempts",
        "3",
        "volume",
        "create",
        "x",
        "--size",
        "8M",
    ]);
    let started = std::time::Instant::now();
    let out = c.output().unwrap();
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Two retries were logged, then one error with the operation, the key and the reason.
    assert_eq!(
        err.matches("AWS KMS call failed; retrying").count(),
        2,
        "{err}"
    );
    assert!(
        err.contains("attempt=1 attempts=3") && err.contains("attempt=2 attempts=3"),
        "{err}"
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("DescribeKey")
            && last.contains("key alias/nbdcrypt/default")
            && last.contains("cannot reach AWS KMS")
            && last.contains("gave up after 3 attempts"),
        "{err}"
    );
    // Backoff waits at least half of 0.25 s + 0.5 s; a bounded retry ends well within a minute.
    assert!(took >= std::time::Duration::from_millis(375), "{took:?}");
    assert!(took < std::time::Duration::from_secs(60), "{took:?}");
}

#[test]
fn aws_kms_outage_at_serve_start_is_ridden_out_by_the_retry() {
    let Some(moto) = moto() else { return };
    let dir = TempDir::new("aws-outage");
    let state = dir.path("state");
    run_ok(aws_cli(&state, &moto.url).args(["volume", "create", "cloud", "--size", "8M"]));
    // Serve through an endpoint that starts answering 1.5 s late (KMS is unreachable at first
    // and comes back while serve retries).
    let port = common::free_port();
    common::tcp_forward(
        format!("127.0.0.1:{port}"),
        moto.url.trim_start_matches("http://").to_owned(),
        std::time::Duration::from_millis(1500),
    );
    let mut env: Vec<(&str, &str)> = AWS_ENV.to_vec();
    let state_s = state.to_str().unwrap().to_owned();
    let endpoint = format!("http://127.0.0.1:{port}");
    env.push(("NBDCRYPT_STATE_DIR", &state_s));
    env.push(("NBDCRYPT_KMS", "aws"));
    env.push(("NBDCRYPT_KMS_ENDPOINT", &endpoint));
    env.push(("NBDCRYPT_KMS_ATTEMPTS", "8"));
    let server = Server::try_start(&dir, &[], &["--volume", "cloud"], &env)
        .unwrap_or_else(|log| panic!("serve did not ride out the outage:\n{log}"));
    let log = server.stop();
    assert!(log.contains("AWS KMS call failed; retrying"), "{log}");
    assert!(log.contains("operation=\"Decrypt\""), "{log}");
    assert!(log.contains("volume ready"), "{log}");
}

/// A KMS endpoint that answers every call with `body` for `GenerateDataKey` and an error
/// otherwise (std only; one thread, stops with the test process).
fn fake_kms(generate_body: String) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut r = BufReader::new(stream);
            loop {
                let (mut target, mut len) = (String::new(), 0usize);
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("x-amz-target:") {
                        target = v.trim().to_owned();
                    } else if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    break;
                }
                let (status, reply) = if target.ends_with("generatedatakey") {
                    ("200 OK", generate_body.clone())
                } else {
                    (
                        "400 Bad Request",
                        r#"{"__type":"NotFoundException","message":"no such key"}"#.to_owned(),
                    )
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{reply}",
                    reply.len()
                );
                if r.get_mut().write_all(resp.as_bytes()).is_err() {
                    break;
                }
            }
        }
    });
    url
}

/// A `GenerateDataKey` answer without `CiphertextBlob` (or `KeyId`) is an error naming the
/// operation and the field: no header is written with an empty wrapped key, no volume is
/// registered, no backing file is left.
#[test]
fn aws_answer_missing_a_field_writes_nothing() {
    // 64 bytes of 0x07, base64.
    let plain = format!("{}Bw==", "BwcH".repeat(21));
    for (body, field) in [
        (
            format!(
                r#"{{"KeyId":"arn:aws:kms:us-east-1:111122223333:key/k","Plaintext":"{plain}"}}"#
            ),
            "CiphertextBlob",
        ),
        (
            format!(r#"{{"Plaintext":"{plain}","CiphertextBlob":"{plain}"}}"#),
            "KeyId",
        ),
    ] {
        let url = fake_kms(body);
        let dir = TempDir::new("aws-missing");
        let state = dir.path("state");
        let out = aws_cli(&state, &url)
            .args([
                "--kms-attempts",
                "1",
                "volume",
                "create",
                "v",
                "--size",
                "16M",
                "--type",
                "persistent",
                "--kms-key",
                "alias/k",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("GenerateDataKey") && err.contains(field),
            "{field}: {err}"
        );
        assert!(
            !state.join("volumes/v.json").exists(),
            "{field}: registered"
        );
        assert!(!state.join("volumes/v.img").exists(), "{field}: file left");
    }
}
