//! nbdcrypt in front of a real distributed store: a throw-away Ceph cluster
//! (scripts/ceph-single-node.sh: one mon, one mgr, one memstore OSD on 127.0.0.1), an RBD
//! image exported by `qemu-nbd` on a Unix socket, and nbdcrypt serving it encrypted. What a
//! user of "dm-crypt on RBD" expects: fio verifies; ext4 through nbdfuse survives a server
//! restart; the RBD image holds only ciphertext that decrypts, with an independent XTS
//! implementation, to what was written; and the loss of `qemu-nbd` under a write load costs no
//! write acknowledged by a completed FLUSH.
//!
//! Every cluster lives in the test's own temporary directory and is stopped when the test ends,
//! also when it fails (the guards' `Drop`). The tests of this file run one at a time (each
//! cluster holds its data in RAM).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::volumes::within;
use common::{Rng, Server, TempDir, have, key_file, peer_available, run_ok, seed};
use nbdcrypt::protocol::consts::{cmd, err};

/// One cluster at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A running single-node cluster; stopped on drop.
struct Ceph {
    dir: PathBuf,
    conf: PathBuf,
}

impl Ceph {
    fn start(dir: &TempDir) -> Ceph {
        let cdir = dir.path("ceph");
        let mut guard = Ceph {
            conf: cdir.join("ceph.conf"),
            dir: cdir,
        };
        let out = Command::new(script())
            .args(["start"])
            .arg(&guard.dir)
            .args(["--osd-mib", "1536"])
            .output()
            .expect("run ceph-single-node.sh");
        if !out.status.success() {
            let log =
                std::fs::read_to_string(guard.dir.join("log/ceph-mon.a.log")).unwrap_or_default();
            // The guard's drop stops whatever did start.
            guard.conf = PathBuf::new();
            panic!(
                "the Ceph cluster did not start: {}\n{}\nmon log tail:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
        }
        guard
    }

    fn rbd(&self, args: &[&str]) -> String {
        run_ok(Command::new("rbd").arg("-c").arg(&self.conf).args(args))
    }

    /// Creates the image `rbd/NAME` of `mib` MiB.
    fn image(&self, name: &str, mib: u64) {
        self.rbd(&["create", "--size", &mib.to_string(), &format!("rbd/{name}")]);
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .status();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-single-node.sh")
}

/// `qemu-nbd` exporting an RBD image on a Unix socket; killed on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
    image: String,
    conf: PathBuf,
}

impl QemuNbd {
    fn start(ceph: &Ceph, dir: &TempDir, image: &str) -> QemuNbd {
        let mut q = QemuNbd {
            child: Command::new("true").spawn().unwrap(),
            socket: dir.path(&format!("{image}.sock")),
            image: image.into(),
            conf: ceph.conf.clone(),
        };
        q.restart();
        q
    }

    /// Starts (again) on the same socket; a killed qemu-nbd leaves its socket file behind.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        self.child = Command::new("qemu-nbd")
            .args(["--persistent", "--shared=8", "--cache=none", "--format=raw"])
            .arg(format!("--socket={}", self.socket.display()))
            .arg(format!(
                "rbd:rbd/{}:conf={}",
                self.image,
                self.conf.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-nbd");
        assert!(
            within(Duration::from_secs(30), || self.socket.exists()).is_some(),
            "qemu-nbd did not come up"
        );
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prerequisites() -> Result<(), String> {
    for tool in [
        "ceph", "ceph-mon", "ceph-mgr", "ceph-osd", "rbd", "qemu-nbd",
    ] {
        have(tool)?;
    }
    Ok(())
}

fn available() -> bool {
    peer_available(
        "Ceph (ceph-mon, ceph-mgr, ceph-osd, rbd) and qemu-nbd",
        prerequisites(),
    )
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A write or flush that may fail: returns the reply's error value.
fn try_request(s: &mut std::net::TcpStream, kind: u16, cookie: u64, off: u64, data: &[u8]) -> u32 {
    let mut b = common::raw_request(kind, cookie, off, u32::try_from(data.len()).unwrap());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[8..16], &cookie.to_be_bytes());
    u32::from_be_bytes([h[4], h[5], h[6], h[7]])
}

#[test]
fn fio_verifies_through_qemu_nbd_on_rbd_and_the_image_holds_only_ciphertext() {
    if !available() || !peer_available("fio", have("fio")) {
        return;
    }
    let _one = lock();
    let dir = TempDir::new("ceph-fio");
    let ceph = Ceph::start(&dir);
    ceph.image("vol", 256);
    let mut q = QemuNbd::start(&ceph, &dir, "vol");
    let mut rng = Rng::new(seed("ceph fio"));
    let (key, key_bytes) = key_file(&dir, "k", &mut rng);
    let spec = format!("name=v,file={},key-file={}", q.uri(), key.display());
    let server = Server::start(&dir, &[spec]);
    common::volumes::fio_verify_randrw(&dir, &server.uri("v"), 2, 32, "4k");
    // Known bytes at a known place: a plaintext pattern and random data, flushed.
    let pattern = b"the storage operator must never read this".repeat(100);
    let random = rng.bytes(3 << 20);
    let mut s = common::raw_connect(&server.addr, "v");
    common::raw_write(&mut s, 1, 100 << 20, &pattern, 0);
    common::raw_write(&mut s, 2, (130 << 20) + 512, &random, 0);
    common::raw_flush(&mut s, 3);
    drop(s);
    let log = server.stop();
    assert!(log.contains("flushed"), "{log}");
    q.kill();
    // What the cluster stores, read by Ceph's own tool.
    let image = dir.path("vol.raw");
    ceph.rbd(&["export", "rbd/vol", image.to_str().unwrap()]);
    let raw = std::fs::read(&image).unwrap();
    assert_eq!(raw.len(), 256 << 20);
    assert!(
        !raw.windows(32).any(|w| w == &pattern[..32]),
        "plaintext reached the RBD image"
    );
    // Decrypted by pyca/cryptography, never nbdcrypt code (aes-xts-plain64, data at offset 0).
    let oracle = |start: u64, len: usize| {
        common::volumes::oracle_decrypt(&image, &hex(&key_bytes), 4096, 0, start, len)
    };
    assert!(oracle(100 << 20, pattern.len()) == pattern);
    assert!(oracle((130 << 20) + 512, random.len()) == random);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `qemu-nbd` is killed in the middle of a write load and started again: nbdcrypt reconnects,
/// the writes carry on, and every write acknowledged before a completed FLUSH reads back. Then,
/// with a 2 s `--upstream-timeout`, a client sees EIO (not a hang) while the upstream stays
/// away, and the export serves again once it is back.
#[test]
fn qemu_nbd_killed_under_a_write_load_loses_no_flushed_write() {
    if !available() {
        return;
    }
    let _one = lock();
    let dir = TempDir::new("ceph-kill");
    let ceph = Ceph::start(&dir);
    ceph.image("vol", 128);
    let mut q = QemuNbd::start(&ceph, &dir, "vol");
    let mut rng = Rng::new(seed("ceph kill"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let spec = format!("name=v,file={},key-file={}", q.uri(), key.display());
    let server = Server::start_with(
        &dir,
        std::slice::from_ref(&spec),
        &["--upstream-timeout", "30"],
    );
    const BLOCK: usize = 64 << 10;
    const BLOCK32: u32 = 64 << 10;
    let base = seed("ceph kill block");
    let block = move |i: u64| -> Vec<u8> { Rng::new(base ^ (i + 1)).bytes(BLOCK) };
    let addr = server.addr.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = std::sync::Arc::clone(&stop);
    let writer = std::thread::spawn(move || {
        let mut s = common::raw_connect(&addr, "v");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let (mut durable, mut pending, mut failed_flushes, mut failed_writes) =
            (Vec::new(), Vec::new(), 0u32, 0u32);
        let mut i = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) && i < 1500 {
            let e = try_request(&mut s, cmd::WRITE, 2 * i, i * BLOCK as u64, &block(i));
            if e == 0 {
                pending.push(i);
            } else {
                failed_writes += 1;
            }
            if i % 8 == 7 {
                if try_request(&mut s, cmd::FLUSH, 2 * i + 1, 0, &[]) == 0 {
                    durable.append(&mut pending);
                } else {
                    // Their fate is unknown: the upstream may have lost them.
                    failed_flushes += 1;
                    pending.clear();
                }
            }
            i += 1;
        }
        let last = try_request(&mut s, cmd::FLUSH, u64::MAX, 0, &[]);
        if last == 0 {
            durable.append(&mut pending);
        } else {
            failed_flushes += 1;
        }
        (durable, i, failed_flushes, failed_writes)
    });
    std::thread::sleep(Duration::from_millis(1500));
    q.kill();
    std::thread::sleep(Duration::from_secs(3));
    q.restart();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (durable, written, failed_flushes, failed_writes) = writer.join().unwrap();
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert_eq!(
        failed_writes, 0,
        "writes failed although the upstream was back in time:\n{log}"
    );
    assert!(
        failed_flushes <= 1,
        "{failed_flushes} flushes failed ({written} writes):\n{log}"
    );
    assert!(
        written > 16 && durable.len() as u64 > written / 2,
        "{written} written, {} durable",
        durable.len()
    );
    let log = server.stop();
    assert!(
        log.contains("upstream connection re-established"),
        "no reconnect logged:\n{log}"
    );
    // A new server on the same upstream reads every durable write back.
    let server = Server::start_with(
        &dir,
        std::slice::from_ref(&spec),
        &["--upstream-timeout", "2"],
    );
    let mut s = common::raw_connect(&server.addr, "v");
    for &i in &durable {
        assert!(
            common::raw_read(&mut s, i, i * BLOCK as u64, BLOCK32) == block(i),
            "block {i}, acknowledged before a completed FLUSH, did not survive"
        );
    }
    // Gone past the timeout: EIO within bounds, then service again once it is back.
    q.kill();
    let start = Instant::now();
    let e = {
        s.write_all(&common::raw_request(cmd::READ, 2, 0, 4096))
            .unwrap();
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        u32::from_be_bytes([h[4], h[5], h[6], h[7]])
    };
    assert_eq!(e, err::EIO);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    q.restart();
    assert!(common::raw_read(&mut s, 3, 0, BLOCK32) == block(0));
    drop(s);
    let log = server.stop();
    assert!(log.contains("upstream still unreachable"), "{log}");
}

/// The user's door without a kernel NBD driver, over RBD: ext4 through nbdfuse and a loop
/// device, files written, the server restarted, every file's sha256 the same, `e2fsck -fn`
/// clean (the scenario of tests/nbdfuse_ext4.rs).
#[test]
fn ext4_through_nbdfuse_over_rbd_survives_a_server_restart() {
    if !available()
        || !peer_available(
            "nbdfuse + losetup + mkfs.ext4",
            common::ext4::prerequisites(),
        )
    {
        return;
    }
    let _one = lock();
    let dir = TempDir::new("ceph-ext4");
    let ceph = Ceph::start(&dir);
    ceph.image("fs", 256);
    let q = QemuNbd::start(&ceph, &dir, "fs");
    let mut rng = Rng::new(seed("ceph ext4"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let spec = format!("name=fs,file={},key-file={}", q.uri(), key.display());
    common::ext4::survives_a_server_restart(
        &dir,
        &spec,
        "fs",
        &[1, 4096, 100_000, 5 << 20],
        &mut rng,
    );
}

/// A persistent volume on an RBD image moves between two nodes sharing a KMS (moto): written on
/// A, imported and refused on B while A serves it, taken over by B after A stops (see
/// `common::nodes`).
#[test]
fn a_persistent_volume_on_rbd_moves_between_nodes() {
    if !available() {
        return;
    }
    let Some(moto) = common::moto::moto() else {
        return;
    };
    let _one = lock();
    let dir = TempDir::new("ceph-nodes");
    let ceph = Ceph::start(&dir);
    ceph.image("pv", 64);
    let q = QemuNbd::start(&ceph, &dir, "pv");
    common::nodes::volume_moves_between_nodes(&q.uri(), &moto);
}
