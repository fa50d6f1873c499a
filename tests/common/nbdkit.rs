//! nbdkit as an upstream NBD server in a test's directory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::TempDir;
use super::volumes::within;

/// nbdkit serving on a Unix socket in the test's directory; killed on drop.
pub struct Nbdkit {
    pub child: Child,
    pub socket: PathBuf,
}

impl Nbdkit {
    pub fn start(dir: &TempDir, name: &str, args: &[&str]) -> Nbdkit {
        let socket = dir.path(&format!("{name}.sock"));
        // A killed nbdkit leaves its socket behind; a restart on the same path replaces it.
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&socket)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        assert!(
            within(Duration::from_secs(20), || socket.exists()).is_some(),
            "nbdkit did not come up"
        );
        Nbdkit { child, socket }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// `serve --export` for a raw encrypted export `name` whose backing is this nbdkit's
    /// default export, with a fresh key file in `dir`.
    pub fn export_spec(&self, dir: &TempDir, name: &str, rng: &mut super::Rng) -> String {
        let (key, _) = super::key_file(dir, &format!("{name}.key"), rng);
        format!(
            "name={name},file={},key-file={}",
            self.uri(""),
            key.display()
        )
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
