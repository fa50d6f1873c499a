//! moto (a mock of AWS KMS, from the test venv) on loopback, and `nbdcrypt` pointed at it.

use std::process::{Child, Command, Stdio};

use super::{have, peer_available};

pub struct Moto {
    pub child: Child,
    pub url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_binary() -> String {
    let py = super::python();
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
    let port = super::free_port();
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

/// moto on loopback, or `None` after [`peer_available`] has reported why not (it panics instead
/// when peers are required).
pub fn moto() -> Option<Moto> {
    start_moto()
        .map_err(|e| peer_available("moto_server", Err(e)))
        .ok()
}

pub const AWS_ENV: [(&str, &str); 6] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    // Never fall through to the instance-metadata endpoint or a user's profile.
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/dev/null"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
];

/// `nbdcrypt` on AWS KMS at `endpoint` with the test credentials and the state in `state`.
pub fn aws_cli(state: &std::path::Path, endpoint: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nbdcrypt"));
    c.env("NBDCRYPT_STATE_DIR", state)
        .env("NBDCRYPT_KMS", "aws")
        .env("NBDCRYPT_KMS_ENDPOINT", endpoint);
    for (k, v) in AWS_ENV {
        c.env(k, v);
    }
    c
}
