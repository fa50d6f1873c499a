//! The AWS KMS path (`aws-sdk-kms`) against moto on loopback: the scratch lifecycle with
//! `--kms aws --kms-endpoint http://127.0.0.1:PORT` and static test credentials; the NBD data
//! reads back intact across a restart, and delete shreds the key. moto does not enforce key
//! states or policies (FACTS.md): those semantics are tested on the local KMS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};

use common::{Server, TempDir, have, peer_available, run_ok};

struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_binary() -> String {
    let py = common::python();
    let sibling = std::path::Path::new(&py).with_file_name("moto_server");
    if sibling.exists() {
        sibling.display().to_string()
    } else {
        "moto_server".into()
    }
}

fn start_moto() -> Result<Moto, String> {
    let bin = moto_binary();
    have(&bin)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {bin}: {e}"))?;
    let moto = Moto {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed().as_secs() > 30 {
            return Err("moto_server did not start".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(moto)
}

const AWS_ENV: [(&str, &str); 6] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    // Never fall through to the instance-metadata endpoint or a user's profile.
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/dev/null"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
];

#[test]
fn aws_kms_scratch_lifecycle_against_moto() {
    let moto = match start_moto() {
        Ok(m) => m,
        Err(e) => {
            peer_available("moto_server", Err(e));
            return;
        }
    };
    if !peer_available("qemu-io", have("qemu-io")) {
        return;
    }
    let dir = TempDir::new("aws");
    let state = dir.path("state");
    let cli = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nbdcrypt"));
        c.env("NBDCRYPT_STATE_DIR", &state)
            .env("NBDCRYPT_KMS", "aws")
            .env("NBDCRYPT_KMS_ENDPOINT", &moto.url);
        for (k, v) in AWS_ENV {
            c.env(k, v);
        }
        c
    };
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
        .filter(|l| l.contains("\"operation\":\"Decrypt\"") && l.contains("\"success\""))
        .count();
    assert_eq!(decrypts, 2, "one Decrypt per serve:\n{audit}");
    assert!(
        audit.contains("\"operation\":\"GenerateDataKey\""),
        "{audit}"
    );

    run_ok(cli().args(["volume", "delete", "cloud"]));
    let err = serve().err().expect("a deleted volume must not serve");
    assert!(err.contains("was deleted"), "{err}");
}

#[test]
fn aws_kms_unreachable_is_a_clear_error() {
    let dir = TempDir::new("aws-down");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = Command::new(env!("CARGO_BIN_EXE_nbdcrypt"));
    c.env("NBDCRYPT_STATE_DIR", dir.path("state"))
        .args([
            "--kms",
            "aws",
            "--kms-endpoint",
            &format!("http://127.0.0.1:{port}"),
        ])
        .args(["volume", "create", "x", "--size", "8M"]);
    for (k, v) in AWS_ENV {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach AWS KMS") && err.contains("DescribeKey"),
        "{err}"
    );
}
