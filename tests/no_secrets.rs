//! Key material never reaches a log, an error message or a state file other than the local KMS
//! store. A whole lifecycle runs with `NBDCRYPT_LOG=trace` (every log line on): create volumes,
//! serve them, write, send bad requests, disable the key and fail to serve, re-enable, rotate,
//! delete a served volume, and fail a few commands. Then every byte of stderr, the audit log and
//! the state directory (except `kms/keys.json`, which holds the KMS material by design) is
//! searched for the persistent volume's data key (from `volume export-key`, whose stdout is the
//! one sanctioned place) and the KMS key material, in hex (both cases), base64 and raw bytes,
//! whole and per 32-byte half. Peer: qemu-io.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::process::Command;

use common::*;
use nbdcrypt::protocol::consts::cmd;

fn cli(state: &std::path::Path) -> Command {
    let mut c = nbdcrypt_cli(state);
    c.env("NBDCRYPT_LOG", "trace");
    c
}

/// Runs a command (success or not) and keeps everything it printed to stderr.
fn capture(c: &mut Command, logs: &mut Vec<u8>) -> (bool, String) {
    let out = c.output().unwrap();
    logs.extend_from_slice(&out.stderr);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
    }
    s
}

/// The forms a secret could leak in.
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut parts = vec![secret.to_vec()];
    if secret.len() == 64 {
        parts.push(secret[..32].to_vec());
        parts.push(secret[32..].to_vec());
    }
    for p in parts {
        let hex = hex::encode(&p);
        out.push(hex.clone().into_bytes());
        out.push(hex.to_uppercase().into_bytes());
        out.push(base64(&p).into_bytes());
        out.push(p.clone());
    }
    out
}

fn files_under(p: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn no_key_material_in_logs_errors_or_state_files() {
    if !peer_available("qemu-io", have("qemu-io")) {
        return;
    }
    let dir = TempDir::new("nosecrets");
    let state = dir.path("state");
    let mut logs = Vec::new();
    let ok = |r: (bool, String)| {
        assert!(r.0, "{}", r.1);
        r.1
    };
    ok(capture(
        cli(&state).args(["kms", "create-key", "--alias", "alias/team"]),
        &mut logs,
    ));
    ok(capture(
        cli(&state)
            .args([
                "volume",
                "create",
                "p",
                "--size",
                "8M",
                "--type",
                "persistent",
            ])
            .args(["--kms-key", "alias/team"]),
        &mut logs,
    ));
    ok(capture(
        cli(&state).args(["volume", "create", "s", "--size", "8M"]),
        &mut logs,
    ));
    ok(capture(
        cli(&state).args(["volume", "describe", "p", "--json"]),
        &mut logs,
    ));
    ok(capture(
        cli(&state).args(["volume", "list", "--json"]),
        &mut logs,
    ));
    // Failures: scratch key export, unknown volume, asymmetric key, disabled key.
    for args in [
        &["volume", "export-key", "s", "--confirm"][..],
        &["volume", "describe", "nope"],
        &["kms", "create-key", "--key-spec", "RSA_2048"],
    ] {
        assert!(!capture(cli(&state).args(args), &mut logs).0, "{args:?}");
    }
    ok(capture(
        cli(&state).args(["kms", "disable-key", "alias/team"]),
        &mut logs,
    ));
    let disabled = Server::try_start(
        &dir,
        &[],
        &["--volume", "p"],
        &[
            ("NBDCRYPT_STATE_DIR", state.to_str().unwrap()),
            ("NBDCRYPT_LOG", "trace"),
        ],
    );
    assert!(disabled.is_err(), "a disabled key still served");
    logs.extend_from_slice(disabled.err().unwrap().as_bytes());
    ok(capture(
        cli(&state).args(["kms", "enable-key", "alias/team"]),
        &mut logs,
    ));
    ok(capture(
        cli(&state).args(["kms", "rotate-key-on-demand", "alias/team"]),
        &mut logs,
    ));

    // Serve at trace level; write, send a bad request, delete the scratch volume while served.
    let server = Server::try_start(
        &dir,
        &[],
        &["--volume", "p", "--volume", "s"],
        &[
            ("NBDCRYPT_STATE_DIR", state.to_str().unwrap()),
            ("NBDCRYPT_LOG", "trace"),
        ],
    )
    .unwrap();
    run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 0 1M",
                "-c",
                "read -P 0x5a 0 1M",
            ])
            .arg(server.uri("p")),
    );
    let mut s = raw_connect(&server.addr, "p");
    s.write_all(&raw_request(cmd::READ, 7, 1 << 40, 4096))
        .unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_ne!(&reply[4..8], &[0, 0, 0, 0], "a read past the end succeeded");
    drop(s);
    ok(capture(
        cli(&state).args(["volume", "delete", "s", "--force"]),
        &mut logs,
    ));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    logs.extend_from_slice(server.stop().as_bytes());

    // The secrets: the data key (its one sanctioned output) and every KMS material version.
    let key_hex = ok(capture(
        cli(&state).args(["volume", "export-key", "p", "--confirm"]),
        &mut logs,
    ));
    let data_key = hex::decode(key_hex.trim()).unwrap();
    assert_eq!(data_key.len(), 64);
    let store: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("kms/keys.json")).unwrap())
            .unwrap();
    let mut secrets = vec![("data key of p".to_owned(), data_key)];
    for (id, k) in store["keys"].as_object().unwrap() {
        for m in k["materials"].as_array().unwrap() {
            secrets.push((
                format!("KMS material of {id}"),
                hex::decode(m["hex"].as_str().unwrap()).unwrap(),
            ));
        }
    }
    assert!(
        secrets.len() >= 4,
        "two keys, one rotated: {}",
        secrets.len()
    );

    let mut haystacks: Vec<(String, Vec<u8>)> = vec![("stderr and server logs".into(), logs)];
    let mut files = Vec::new();
    files_under(&state, &mut files);
    for f in files {
        if f.ends_with("kms/keys.json") {
            continue;
        }
        haystacks.push((f.display().to_string(), std::fs::read(&f).unwrap()));
    }
    // The logs really are verbose: debug-level refusals, connections, key-service failures.
    let text = String::from_utf8_lossy(&haystacks[0].1).into_owned();
    for line in [
        "connection opened",
        "request refused",
        "DisabledException",
        "volume ready",
    ] {
        assert!(
            text.contains(line),
            "no {line:?} in the captured logs:\n{text}"
        );
    }
    for (what, secret) in &secrets {
        for form in forms(secret) {
            for (name, hay) in &haystacks {
                assert!(
                    !hay.windows(form.len()).any(|w| w == form.as_slice()),
                    "{what} found in {name}"
                );
            }
        }
    }
}
