//! The upstream NBD client (`nbdcrypt::upstream`) against nbdkit, a server this project did
//! not write: negotiation (structured and simple replies), the upstream's block-size limits
//! (nbdkit's blocksize-policy filter advertises them and refuses violations), many requests in
//! flight from many threads on one connection, an encrypted volume whose only store is the
//! upstream, and failures that name the upstream instead of hanging.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::nbdkit::Nbdkit;
use common::{Rng, TempDir, have, peer_available, run_ok, seed, test_volume};
use nbdcrypt::storage::Storage;
use nbdcrypt::upstream::{NbdStore, Options, UpstreamError};

fn opts(connections: usize, timeout: Duration) -> Options {
    Options {
        timeout,
        connections,
    }
}

fn available() -> bool {
    peer_available("nbdkit", have("nbdkit"))
}

/// Runs `f` on a thread and fails the test if it has not returned within `limit`.
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("the call hung")
}

#[test]
fn store_round_trips_through_nbdkit_in_pieces_within_its_block_sizes() {
    if !available() {
        return;
    }
    let dir = TempDir::new("upstream-sizes");
    let kit = Nbdkit::start(
        &dir,
        "kit",
        &[
            "--filter=blocksize-policy",
            "memory",
            "8M",
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let store = NbdStore::open(&kit.uri("")).unwrap();
    let info = store.info();
    assert_eq!(info.size, 8 << 20);
    assert_eq!(
        (info.min_block, info.preferred_block, info.max_payload),
        (512, 4096, 65536)
    );
    let mut rng = Rng::new(seed("upstream sizes"));
    // 1 MiB + 512 at an odd sector: 17 pieces, each within the 64 KiB maximum (nbdkit refuses
    // anything larger with this policy).
    let data = rng.bytes((1 << 20) + 512);
    store.write_at(&data, 3 * 512).unwrap();
    let mut back = vec![0u8; data.len()];
    store.read_at(&mut back, 3 * 512).unwrap();
    assert!(back == data, "read back differs");
    // In place: each reply buffer is handed over as it is, piece by piece, in order.
    let mut seen = vec![0u8; 1 << 20];
    let mut pieces = Vec::new();
    let whole = store
        .read_in_place(3 * 512, 1 << 20, &mut |at, bytes| {
            seen[at..at + bytes.len()].copy_from_slice(bytes);
            pieces.push((at, bytes.len()));
        })
        .unwrap();
    assert!(whole && seen == data[..1 << 20], "in-place read differs");
    assert_eq!(
        pieces,
        (0..16).map(|i| (i * 65536, 65536)).collect::<Vec<_>>()
    );
    // Not past the end of the export (the caller reads, which gives zeroes there).
    let past = store
        .read_in_place((8 << 20) - 4096, 8192, &mut |_, _| panic!("called"))
        .unwrap();
    assert!(!past);
    // WRITE_ZEROES (nbdkit memory has it): the range reads as zeroes, the rest stays.
    store.punch_hole(4096, 65536 * 2).unwrap();
    let mut z = vec![1u8; 65536 * 2];
    store.read_at(&mut z, 4096).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    let mut first = vec![0u8; 512];
    store.read_at(&mut first, 3 * 512).unwrap();
    assert_eq!(first, data[..512]);
    // Past the end reads as zeroes, as a short file does.
    let mut tail = vec![7u8; 8192];
    store.read_at(&mut tail, (8 << 20) - 4096).unwrap();
    assert!(tail[4096..].iter().all(|&b| b == 0));
    store.sync().unwrap();
    store.write_durable_at(&data[..4096], 0).unwrap();
    // Below the upstream's minimum: refused here, naming the upstream, before it is sent.
    let e = store.write_at(&[1u8; 100], 512).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("minimum block size 512"), "{e}");
    assert!(e.to_string().contains(&kit.uri("")), "{e}");
}

#[test]
fn many_threads_keep_requests_in_flight_on_one_connection() {
    if !available() {
        return;
    }
    let dir = TempDir::new("upstream-threads");
    // nbdkit's delay filter holds every read 10 ms: 8 threads × 20 reads take about 1.6 s
    // one at a time and about 0.2 s when they are in flight together.
    let kit = Nbdkit::start(
        &dir,
        "kit",
        &["--filter=delay", "memory", "16M", "rdelay=10ms"],
    );
    let store = Arc::new(NbdStore::open(&kit.uri("")).unwrap());
    let start = std::time::Instant::now();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed("upstream threads") ^ t);
                for i in 0..20u64 {
                    let off = (t * 20 + i) * 65536;
                    let data = rng.bytes(65536);
                    store.write_at(&data, off).unwrap();
                    let mut back = vec![0u8; data.len()];
                    store.read_at(&mut back, off).unwrap();
                    assert!(back == data, "thread {t} op {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(1200),
        "8 threads' reads did not overlap: {took:?} (one at a time is 1.6 s)"
    );
}

#[test]
fn simple_replies_work_when_the_server_offers_no_structured_replies() {
    if !available() {
        return;
    }
    let dir = TempDir::new("upstream-simple");
    let kit = Nbdkit::start(&dir, "kit", &["--no-sr", "memory", "1M"]);
    let store = NbdStore::open(&kit.uri("")).unwrap();
    let data = Rng::new(seed("upstream simple")).bytes(65536);
    store.write_at(&data, 4096).unwrap();
    let mut back = vec![0u8; data.len()];
    store.read_at(&mut back, 4096).unwrap();
    assert!(back == data);
}

#[test]
fn an_encrypted_volume_keeps_only_ciphertext_upstream() {
    if !available() {
        return;
    }
    let dir = TempDir::new("upstream-volume");
    let kit = Nbdkit::start(&dir, "kit", &["memory", "4M"]);
    let store = NbdStore::open(&kit.uri("")).unwrap();
    let volume = test_volume(Box::new(store), 4 << 20, 4096);
    let pattern = b"plaintext that must never reach the storage cluster. ".repeat(2000);
    volume.write(12_345, &mut pattern.clone(), false).unwrap();
    volume.flush().unwrap();
    let mut back = vec![0u8; pattern.len()];
    volume.read(12_345, &mut back).unwrap();
    assert!(back == pattern);
    // What the upstream holds: a second connection reads it raw.
    let raw = NbdStore::open(&kit.uri("")).unwrap();
    let mut all = vec![0u8; 4 << 20];
    raw.read_at(&mut all, 0).unwrap();
    assert!(
        !all.windows(32).any(|w| w == &pattern[..32]),
        "plaintext reached the upstream"
    );
    assert!(all.iter().any(|&b| b != 0), "nothing was written upstream");
}

#[test]
fn failures_name_the_upstream_and_never_hang() {
    if !available() {
        return;
    }
    let dir = TempDir::new("upstream-fail");
    // Nothing listens on this socket.
    let missing = format!("nbd+unix:///?socket={}", dir.path("nobody.sock").display());
    let e = NbdStore::open(&missing).unwrap_err();
    assert!(matches!(e, UpstreamError::Io { .. }), "{e:?}");
    assert!(
        e.to_string().contains("cannot connect") && e.to_string().contains(&missing),
        "{e}"
    );
    // An export the server does not have.
    let strict = Nbdkit::start(
        &dir,
        "strict",
        &[
            "--filter=exportname",
            "memory",
            "1M",
            "exportname=good",
            "exportname-strict=true",
        ],
    );
    let e = NbdStore::open(&strict.uri("bad")).unwrap_err();
    assert!(matches!(e, UpstreamError::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("\"bad\""), "{e}");
    NbdStore::open(&strict.uri("good")).unwrap();
    // The server goes away under a connected store and stays away: requests are retried on
    // new connections for the upstream timeout (1 s here), then fail, naming it.
    let mut kit = Nbdkit::start(&dir, "kit", &["memory", "1M"]);
    let uri = kit.uri("");
    let store = Arc::new(NbdStore::open_with(&uri, &opts(1, Duration::from_secs(1))).unwrap());
    store.write_at(&[5u8; 4096], 0).unwrap();
    kit.child.kill().unwrap();
    kit.child.wait().unwrap();
    let s = Arc::clone(&store);
    let e = bounded(Duration::from_secs(20), move || {
        let mut buf = vec![0u8; 4096];
        s.read_at(&mut buf, 0).unwrap_err()
    });
    assert!(e.to_string().contains(&uri), "{e}");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("unreachable for 1 s"), "{e}");
    // And go on failing within the timeout, not hanging.
    let s = Arc::clone(&store);
    bounded(Duration::from_secs(20), move || {
        s.write_at(&[1u8; 4096], 0).unwrap_err()
    });
}

/// `serve --export …,file=nbd+unix://…`: fio's verified random reads and writes (4 KiB to
/// 1 MiB, 4 jobs × QD16) through nbdcrypt into nbdkit come back intact, no request touched the
/// upstream from a tokio worker (nothing ran inline) nor from a crypto worker, and the upstream
/// holds no plaintext.
#[test]
fn served_over_an_upstream_fio_verifies_and_only_ciphertext_goes_up() {
    if !available() || !peer_available("fio", have("fio")) {
        return;
    }
    let dir = TempDir::new("upstream-serve");
    let kit = Nbdkit::start(&dir, "kit", &["memory", "64M"]);
    let mut rng = Rng::new(seed("upstream serve"));
    let spec = kit.export_spec(&dir, "up", &mut rng);
    let server = common::Server::start(&dir, &[spec]);
    common::volumes::fio_verify_randrw(&dir, &server.uri("up"), 4, 8, "4k");
    // A plaintext pattern written through the server never reaches nbdkit.
    let pattern = b"cluster operators must not read this".repeat(113);
    let mut s = common::raw_connect(&server.addr, "up");
    common::raw_write(&mut s, 7, 40 << 20, &pattern, 0);
    assert_eq!(
        common::raw_read(&mut s, 8, 40 << 20, u32::try_from(pattern.len()).unwrap()),
        pattern
    );
    drop(s);
    let log = server.stop();
    assert!(
        log.contains("backing store is an upstream NBD export"),
        "{log}"
    );
    assert_eq!(common::placed(&log, "inline"), 0, "{log}");
    assert_eq!(common::placed(&log, "workers"), 0, "{log}");
    // fio's reads and writes, 4 KiB to 1 MiB, went upstream without a thread waiting for
    // each; the one unaligned write above waited (its placement counts as submitted: it
    // was declined there and written the waiting way).
    assert!(common::placed(&log, "submitted") > 0, "{log}");
    let raw = NbdStore::open(&kit.uri("")).unwrap();
    let mut all = vec![0u8; 64 << 20];
    raw.read_at(&mut all, 0).unwrap();
    assert!(
        !all.windows(36).any(|w| w == &pattern[..36]),
        "plaintext reached the upstream"
    );
}

/// The upstream restarts (nbdkit's file plugin keeps the bytes): a write issued while it is down
/// completes once it is back, on a new connection; what was written and flushed before reads
/// back; and a flush after a reconnect that followed unflushed writes fails once (they may
/// have been lost with the upstream) instead of vouching for them.
#[test]
fn the_store_reconnects_to_a_restarted_upstream_and_flushes_honestly() {
    if !available() {
        return;
    }
    let dir = TempDir::new("upstream-restart");
    let img = dir.path("disk.img");
    run_ok(Command::new("truncate").arg("-s").arg("4M").arg(&img));
    let file_arg = format!("file={}", img.display());
    let mut kit = Nbdkit::start(&dir, "kit", &["file", &file_arg]);
    let store =
        Arc::new(NbdStore::open_with(&kit.uri(""), &opts(1, Duration::from_secs(20))).unwrap());
    let mut rng = Rng::new(seed("upstream restart"));
    let a = rng.bytes(65536);
    store.write_at(&a, 0).unwrap();
    store.sync().unwrap();

    // Down; a write waits for it to come back.
    kit.child.kill().unwrap();
    kit.child.wait().unwrap();
    let b = rng.bytes(65536);
    let writer = {
        let (store, b) = (Arc::clone(&store), b.clone());
        std::thread::spawn(move || store.write_at(&b, 65536))
    };
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !writer.is_finished(),
        "the write did not wait for the upstream"
    );
    let kit = Nbdkit::start(&dir, "kit", &["file", &file_arg]);
    writer.join().unwrap().unwrap();
    assert_eq!(store.reconnects(), 1);
    // A was flushed before the loss and B was acknowledged after it: the flush is honest.
    store.sync().unwrap();
    let mut back = vec![0u8; 2 * 65536];
    store.read_at(&mut back, 0).unwrap();
    assert!(back[..65536] == a[..] && back[65536..] == b[..]);

    // An acknowledged write that no flush covered, then the upstream restarts: the next flush
    // fails once, then flushes succeed again.
    store.write_at(&rng.bytes(4096), 2 << 20).unwrap();
    let mut kit = kit;
    kit.child.kill().unwrap();
    kit.child.wait().unwrap();
    let _kit = Nbdkit::start(&dir, "kit", &["file", &file_arg]);
    let mut first = vec![0u8; 4096];
    store.read_at(&mut first, 0).unwrap();
    assert_eq!(first, a[..4096]);
    assert_eq!(store.reconnects(), 2);
    let e = store.sync().unwrap_err();
    assert!(e.to_string().contains("may not be durable"), "{e}");
    store.sync().unwrap();

    // The same for a write submitted without waiting: its acknowledgement counts as well.
    let (tx, rx) = std::sync::mpsc::channel();
    let data: nbdcrypt::storage::WriteData = Arc::new(rng.bytes(4096));
    let done: nbdcrypt::storage::ReadDone = Box::new(move |acked| {
        let _ = tx.send(acked.is_some());
    });
    assert!(store.submit_write(3 << 20, data, false, done).is_ok());
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
    let mut kit = _kit;
    kit.child.kill().unwrap();
    kit.child.wait().unwrap();
    let _kit = Nbdkit::start(&dir, "kit", &["file", &file_arg]);
    store.read_at(&mut first, 0).unwrap();
    assert_eq!(store.reconnects(), 3);
    let e = store.sync().unwrap_err();
    assert!(e.to_string().contains("may not be durable"), "{e}");
    store.sync().unwrap();
}

/// Served over an upstream that dies: with `--upstream-timeout 1`, a client's read is answered
/// with EIO after about a second, not left hanging.
#[test]
fn a_served_export_answers_eio_when_its_upstream_stays_away() {
    if !available() {
        return;
    }
    use std::io::{Read, Write};
    let dir = TempDir::new("upstream-eio");
    let mut kit = Nbdkit::start(&dir, "kit", &["memory", "8M"]);
    let mut rng = Rng::new(seed("upstream eio"));
    let spec = kit.export_spec(&dir, "up", &mut rng);
    let server = common::Server::start_with(&dir, &[spec], &["--upstream-timeout", "1"]);
    let mut s = common::raw_connect(&server.addr, "up");
    assert_eq!(common::raw_read(&mut s, 1, 0, 4096), vec![0u8; 4096]);
    kit.child.kill().unwrap();
    kit.child.wait().unwrap();
    let start = std::time::Instant::now();
    s.write_all(&common::raw_request(
        nbdcrypt::protocol::consts::cmd::READ,
        2,
        0,
        4096,
    ))
    .unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[8..16], &2u64.to_be_bytes());
    assert_eq!(
        u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        nbdcrypt::protocol::consts::err::EIO
    );
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    drop(s);
    let log = server.stop();
    assert!(log.contains("upstream still unreachable"), "{log}");
}

/// Several connections where the upstream allows them (nbdkit memory advertises multi-conn):
/// requests spread over all four, 8 threads' writes read back through any, a flush reaches
/// every connection. nbdkit's multi-conn filter withholding the flag gives one connection.
#[test]
fn several_connections_only_when_the_upstream_advertises_multi_conn() {
    if !available() {
        return;
    }
    let dir = TempDir::new("upstream-multi");
    let kit = Nbdkit::start(&dir, "kit", &["memory", "16M"]);
    let store =
        Arc::new(NbdStore::open_with(&kit.uri(""), &opts(4, Duration::from_secs(10))).unwrap());
    assert_eq!(store.connections(), 4);
    let mut rng = Rng::new(seed("upstream multi"));
    let blocks: Vec<Vec<u8>> = (0..32).map(|_| rng.bytes(64 << 10)).collect();
    let blocks = Arc::new(blocks);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (store, blocks) = (Arc::clone(&store), Arc::clone(&blocks));
            std::thread::spawn(move || {
                for i in (t..32).step_by(8) {
                    store.write_at(&blocks[i], (i as u64) << 16).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    store.sync().unwrap();
    for (i, b) in blocks.iter().enumerate() {
        let mut got = vec![0u8; 64 << 10];
        store.read_at(&mut got, (i as u64) << 16).unwrap();
        assert!(&got == b, "block {i}");
    }
    let single = Nbdkit::start(
        &dir,
        "single",
        &[
            "--filter=multi-conn",
            "memory",
            "16M",
            "multi-conn-mode=disable",
        ],
    );
    let one = NbdStore::open_with(&single.uri(""), &opts(4, Duration::from_secs(10))).unwrap();
    assert_eq!(one.connections(), 1);
    one.write_at(&blocks[0], 0).unwrap();
    one.sync().unwrap();
}
