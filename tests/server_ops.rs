//! Server operations: unix sockets, the connection limit, and a full backing store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{
    LoopDev, Rng, Server, TempDir, have, key_file, keyed_export, peer_available, run_ok, seed,
};
use nbdcrypt::protocol::consts::{client_flags, cmd, err, opt, rep};
use nbdcrypt::protocol::{InfoRequest, OptionHeader, OptionReplyHeader, Request, SimpleReply};

#[test]
fn unix_socket_serves_nbdinfo() {
    if !peer_available("nbdinfo", have("nbdinfo")) {
        return;
    }
    let dir = TempDir::new("unix");
    let mut rng = Rng::new(seed("unix"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let sock = dir.path("nbd.sock");
    let server = Server::start_with(
        &dir,
        &[format!(
            "name=u,file={},key-file={},size=8M",
            dir.path("u.img").display(),
            key.display()
        )],
        &["--unix", sock.to_str().unwrap()],
    );
    let out =
        run_ok(Command::new("nbdinfo").arg(format!("nbd+unix:///u?socket={}", sock.display())));
    assert!(out.contains("export-size: 8388608"), "{out}");
    drop(server);
    assert!(!sock.exists(), "the socket is removed on shutdown");
}

#[test]
fn connection_limit_holds_extra_clients_until_a_slot_frees() {
    let dir = TempDir::new("limit");
    let mut rng = Rng::new(seed("limit"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let server = Server::start_with(
        &dir,
        &[format!(
            "name=d,file={},key-file={},size=8M",
            dir.path("d.img").display(),
            key.display()
        )],
        &["--max-connections", "1"],
    );
    let mut first = TcpStream::connect(&server.addr).unwrap();
    let mut greeting = [0u8; 18];
    first.read_exact(&mut greeting).unwrap();
    let mut second = TcpStream::connect(&server.addr).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    assert!(
        second.read_exact(&mut greeting).is_err(),
        "a second client was served over the limit"
    );
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    second.read_exact(&mut greeting).unwrap();
}

#[test]
fn silent_clients_are_dropped_after_the_handshake_timeout() {
    // Slow-loris: six clients connect and never negotiate, against two connection slots.
    // Each is disconnected after the 1 s handshake timeout, so a real client queued behind
    // them is served within seconds, not never.
    if !peer_available("nbdinfo", have("nbdinfo")) {
        return;
    }
    let dir = TempDir::new("loris");
    let server = Server::start_with(
        &dir,
        &[keyed_export(&dir, "d", ",size=8M")],
        &["--max-connections", "2", "--handshake-timeout", "1"],
    );
    let idle: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(&server.addr).unwrap())
        .collect();
    let start = std::time::Instant::now();
    // Bounded: without the handshake timeout nbdinfo would wait for a greeting forever.
    let out = run_ok(
        Command::new("timeout")
            .args(["20", "nbdinfo", "--size"])
            .arg(server.uri("d")),
    );
    assert_eq!(out.trim(), (8u64 << 20).to_string());
    let waited = start.elapsed();
    assert!(waited < Duration::from_secs(15), "served after {waited:?}");
    // The silent clients were disconnected by the server (EOF after the greeting).
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let n = s.read_to_end(&mut buf).unwrap();
        assert_eq!(n, 18, "greeting, then the server closed");
    }
    let log = server.stop();
    assert_eq!(log.matches("negotiation took too long").count(), 6, "{log}");
}

fn tmpfs_available() -> Result<(), String> {
    have("mount")?;
    let uid = run_ok(Command::new("id").arg("-u"));
    if uid.trim() == "0" {
        Ok(())
    } else {
        Err("mounting a tmpfs needs root".into())
    }
}

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_backing_store_gives_enospc_and_recovers_after_trim() {
    if !peer_available("tmpfs mount", tmpfs_available()) {
        return;
    }
    let dir = TempDir::new("enospc");
    let mut rng = Rng::new(seed("enospc"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let small = dir.path("small");
    std::fs::create_dir_all(&small).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(&small),
    );
    let _fs = Tmpfs(small.clone());
    // A 64 MiB sparse volume on a 2 MiB file system.
    let server = Server::start(
        &dir,
        &[format!(
            "name=d,file={},key-file={},size=64M,discards",
            small.join("d.img").display(),
            key.display()
        )],
    );
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(client_flags::C_FIXED_NEWSTYLE | client_flags::C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut d = Vec::new();
    InfoRequest {
        name: "d".into(),
        requests: vec![],
    }
    .encode(&mut d);
    let mut b = Vec::new();
    OptionHeader {
        code: opt::GO,
        len: u32::try_from(d.len()).unwrap(),
    }
    .encode(&mut b);
    b.extend_from_slice(&d);
    s.write_all(&b).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let h = OptionReplyHeader::decode(&h).unwrap();
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data).unwrap();
        if h.reply_type == rep::ACK {
            break;
        }
    }
    let write = |s: &mut TcpStream, cookie: u64, offset: u64| -> u32 {
        let payload = vec![0x5Au8; 1 << 20];
        let mut b = Vec::new();
        Request {
            flags: 0,
            kind: cmd::WRITE,
            cookie,
            offset,
            length: 1 << 20,
        }
        .encode(&mut b);
        b.extend_from_slice(&payload);
        s.write_all(&b).unwrap();
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap();
        let r = SimpleReply::decode(&r).unwrap();
        assert_eq!(r.cookie, cookie);
        r.error
    };
    let mut results = Vec::new();
    for i in 0..4u64 {
        results.push(write(&mut s, i, i << 20));
    }
    assert_eq!(results[0], 0, "{results:?}");
    assert!(results.contains(&err::ENOSPC), "{results:?}");
    // Free space by discarding the first MiB, then writing works again.
    let mut b = Vec::new();
    Request {
        flags: 0,
        kind: cmd::TRIM,
        cookie: 50,
        offset: 0,
        length: 1 << 20,
    }
    .encode(&mut b);
    s.write_all(&b).unwrap();
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(SimpleReply::decode(&r).unwrap().error, 0);
    assert_eq!(write(&mut s, 60, 40 << 20), 0, "write after freeing space");
    assert!(server_alive(&server));
}

fn server_alive(server: &Server) -> bool {
    TcpStream::connect(&server.addr).is_ok()
}

#[test]
fn raw_block_device_backs_an_export() {
    let prereq = tmpfs_available()
        .and_then(|()| have("losetup"))
        .and_then(|()| have("qemu-io"));
    if !peer_available("losetup + qemu-io (root)", prereq) {
        return;
    }
    let dir = TempDir::new("blockdev");
    let mut rng = Rng::new(seed("blockdev"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let img = dir.path("dev.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let dev = LoopDev::attach(&img);
    // No size: the export takes the device's size.
    let server = Server::start(
        &dir,
        &[format!("name=b,file={},key-file={}", dev.0, key.display())],
    );
    let out = run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x6b 5M 3M",
                "-c",
                "read -P 0x6b 5M 3M",
                "-c",
                "read -P 0 0 5M",
            ])
            .arg(server.uri("b")),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    drop(server);
    // The device holds ciphertext, not the pattern.
    let raw = std::fs::read(&img).unwrap();
    assert!(
        !raw[5 << 20..8 << 20]
            .windows(64)
            .any(|w| w.iter().all(|&b| b == 0x6b))
    );
}
