//! A failing backing store: nbdcrypt's backing file is an nbdfuse file over `nbdkit memory`
//! with the error filter, which fails every request with EIO while a trigger file exists.
//! Writes (and reads the page cache cannot answer) get `NBD_EIO`, the server stays up and keeps
//! serving, and once the store recovers the data written before reads back and writes work.
//! Peers: nbdkit (error filter), nbdfuse, qemu-io, nbdinfo; root and /dev/fuse.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn prerequisites() -> Result<(), String> {
    for tool in ["nbdkit", "nbdfuse", "qemu-io", "nbdinfo"] {
        have(tool)?;
    }
    if run_ok(Command::new("id").arg("-u")).trim() != "0" || !Path::new("/dev/fuse").exists() {
        return Err("needs root and /dev/fuse for nbdfuse".into());
    }
    Ok(())
}

/// nbdkit + nbdfuse, torn down on drop.
struct FailingStore {
    nbdkit: Child,
    nbdfuse: Child,
    mountpoint: std::path::PathBuf,
}

impl Drop for FailingStore {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mountpoint)
            .status();
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
        let _ = self.nbdkit.kill();
        let _ = self.nbdkit.wait();
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = c.arg(uri).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success()
        && !text.contains("failed")
        && !text.contains("Pattern verification failed");
    (ok, text)
}

#[test]
fn backing_store_eio_is_reported_and_the_server_recovers() {
    if !peer_available("nbdkit + nbdfuse + qemu-io (root)", prerequisites()) {
        return;
    }
    let dir = TempDir::new("eio");
    let sock = dir.path("store.sock");
    let trigger = dir.path("trigger");
    let nbdkit = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&sock)
        .args([
            "--filter=error",
            "memory",
            "16M",
            "error=EIO",
            "error-rate=100%",
        ])
        .arg(format!("error-file={}", trigger.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mountpoint = dir.path("fuse");
    std::fs::create_dir(&mountpoint).unwrap();
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let nbdfuse = Command::new("nbdfuse")
        .arg(mountpoint.join("disk"))
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let store = FailingStore {
        nbdkit,
        nbdfuse,
        mountpoint: mountpoint.clone(),
    };
    let disk = mountpoint.join("disk");
    for _ in 0..100 {
        if disk.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(disk.exists(), "nbdfuse did not come up");
    let mut rng = Rng::new(seed("eio"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let server = Server::start(
        &dir,
        &[format!(
            "name=e,file={},key-file={}",
            disk.display(),
            key.display()
        )],
    );
    let uri = server.uri("e");
    let (ok, out) = qemu_io(&uri, &["write -P 0x11 0 64k"]);
    assert!(ok, "{out}");

    std::fs::write(&trigger, b"").unwrap();
    let (ok, out) = qemu_io(&uri, &["write -P 0x22 64k 64k"]);
    assert!(!ok && out.contains("Input/output error"), "write: {out}");
    let (ok, out) = qemu_io(&uri, &["read 8M 64k"]);
    assert!(
        !ok && out.contains("Input/output error"),
        "uncached read: {out}"
    );
    // Still serving: the export answers, the process is alive.
    assert_eq!(
        run_ok(Command::new("nbdinfo").arg("--size").arg(&uri)).trim(),
        (16u64 << 20).to_string()
    );

    std::fs::remove_file(&trigger).unwrap();
    let (ok, out) = qemu_io(
        &uri,
        &[
            "read -P 0x11 0 64k",
            "write -P 0x33 64k 64k",
            "read -P 0x33 64k 64k",
            "read 8M 64k",
        ],
    );
    assert!(ok, "after recovery: {out}");
    let log = server.stop();
    assert!(!log.contains("panicked"), "{log}");
    drop(store);
}
