//! Crypto-shredding a volume that a server is serving: the server withdraws it and its key
//! disappears from the server's memory (scanned through `/proc/PID/mem`), on every backend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{Server, TempDir, run_ok};

fn cli(state: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nbdcrypt"));
    c.env("NBDCRYPT_STATE_DIR", state)
        .env_remove("NBDCRYPT_LOG");
    c
}

fn qemu_io(server: &Server, volume: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = run_ok(c.arg(server.uri(volume)));
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// Whether any readable, writable mapping of process `pid` contains `needle`.
fn memory_contains(pid: u32, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap()];
        if mem.read_exact_at(&mut buf, start).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

#[test]
fn deleting_a_served_volume_withdraws_it_and_wipes_its_key_from_server_memory() {
    if !common::peer_available("qemu-io", common::have("qemu-io")) {
        return;
    }
    for backend in nbdcrypt::crypto::BackendKind::available() {
        shred_live(backend.name());
    }
}

fn shred_live(backend: &str) {
    let dir = TempDir::new(&format!("shred-live-{backend}"));
    let state = dir.path("state");
    run_ok(cli(&state).args(["kms", "create-key", "--alias", "alias/m"]));
    run_ok(cli(&state).args([
        "volume",
        "create",
        "m",
        "--size",
        "8M",
        "--type",
        "persistent",
        "--kms-key",
        "alias/m",
    ]));
    let hex_key = run_ok(cli(&state).args(["volume", "export-key", "m", "--confirm"]));
    let key = hex::decode(hex_key.trim()).unwrap();
    let server = Server::try_start(
        &dir,
        &[],
        &["--volume", "m", "--backend", backend],
        &[("NBDCRYPT_STATE_DIR", state.to_str().unwrap())],
    )
    .unwrap();
    qemu_io(
        &server,
        "m",
        &["write -P 0x11 0 256k", "read -P 0x11 0 256k"],
    );
    let pid = server.child.id();
    // The AES-256 key schedules begin with the raw key halves: the key is in memory now.
    assert!(
        memory_contains(pid, &key[..32]) && memory_contains(pid, &key[32..]),
        "{backend}: the scan must find the key while the volume is served"
    );
    run_ok(cli(&state).args(["volume", "delete", "m", "--force"]));
    let start = std::time::Instant::now();
    loop {
        let log = std::fs::read_to_string(&server.log).unwrap_or_default();
        if log.contains("volume key destroyed in memory") {
            break;
        }
        assert!(
            start.elapsed().as_secs() < 20,
            "the server did not drop the deleted volume:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !memory_contains(pid, &key[..32]),
        "data-key half K1 survives in the server's memory"
    );
    assert!(
        !memory_contains(pid, &key[32..]),
        "tweak-key half K2 survives in the server's memory"
    );
    // The export is gone for new clients.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(server.uri("m"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a deleted volume is still served");
    drop(server.stop());
}
