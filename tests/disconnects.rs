//! Clients that vanish in the middle of things: halfway through a WRITE payload (aligned and
//! unaligned), and halfway through reading a large reply, many times over, while another client
//! works on the same volume.
//!
//! What must hold: an incomplete WRITE changes nothing (the flushed data around it reads back
//! exactly, never a half-written or garbage sector); the other client is unaffected; and nothing
//! leaks: the server's descriptors return to their baseline, and its payload-buffer budget (set
//! small here) is whole again, which a full-budget read proves.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{
    Rng, Server, TempDir, fd_targets, keyed_export, raw_connect, raw_flush, raw_read, raw_request,
    raw_write, seed,
};
use nbdcrypt::protocol::consts::cmd;

#[test]
fn disconnects_mid_write_payload_and_mid_reply_change_nothing_and_leak_nothing() {
    let dir = TempDir::new("disconnects");
    let mut rng = Rng::new(seed("disconnects"));
    // A 40 MiB payload budget: one leaked 32 MiB read would make the final read wait forever.
    let server = Server::start_with(
        &dir,
        &[keyed_export(&dir, "d", ",size=64M")],
        &["--max-buffer-mib", "40"],
    );
    let pid = server.child.id();
    let region = 4u64 << 20;
    let old = rng.bytes(region as usize);
    let mut keeper = raw_connect(&server.addr, "d");
    keeper
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    raw_write(&mut keeper, 1, 0, &old, 0);
    raw_flush(&mut keeper, 2);
    let baseline_fds = fd_targets(pid).len();

    // A second client works on its own range throughout.
    let other = {
        let addr = server.addr.clone();
        let mut rng = Rng::new(seed("disconnects-other"));
        std::thread::spawn(move || {
            let mut s = raw_connect(&addr, "d");
            for i in 0..200u64 {
                let data = rng.bytes(4096 + (i as usize % 7) * 1000);
                let off = (32 << 20) + (i % 64) * 9000 + 123;
                raw_write(&mut s, 10 + 2 * i, off, &data, 0);
                assert_eq!(
                    raw_read(&mut s, 11 + 2 * i, off, u32::try_from(data.len()).unwrap()),
                    data
                );
            }
        })
    };

    for round in 0..20u64 {
        // Mid-WRITE payload: aligned 1 MiB, and unaligned over partial sectors, each with part
        // of the payload sent.
        for (off, len, sent) in [
            (0u64, 1u32 << 20, 300_000usize),
            (1000 + round * 4096, 10_000, 5_000),
            (region - 3000, 2000, 1),
        ] {
            let mut s = raw_connect(&server.addr, "d");
            let mut b = raw_request(cmd::WRITE, 1, off, len);
            b.extend(std::iter::repeat_n(0xee_u8, sent));
            s.write_all(&b).unwrap();
            drop(s);
        }
        // Mid-reply: a 32 MiB read (pipelined behind small ones) abandoned after a few bytes.
        let mut s = raw_connect(&server.addr, "d");
        let mut b = raw_request(cmd::READ, 1, 0, 4096);
        b.extend_from_slice(&raw_request(cmd::READ, 2, 0, 32 << 20));
        b.extend_from_slice(&raw_request(cmd::READ, 3, 8192, 4096));
        s.write_all(&b).unwrap();
        let mut some = [0u8; 100];
        s.read_exact(&mut some).unwrap();
        drop(s);
    }
    other.join().unwrap();

    // The flushed data is exactly what it was: no byte of any incomplete write landed.
    let back = raw_read(&mut keeper, 3, 0, u32::try_from(region).unwrap());
    let first_diff = back.iter().zip(&old).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "flushed data changed at byte {first_diff:?}"
    );

    // Nothing leaked: descriptors back to the baseline (the abandoned connections are gone) and
    // the whole payload budget is available again.
    let start = std::time::Instant::now();
    while fd_targets(pid).len() > baseline_fds && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fd_targets(pid).len(), baseline_fds, "descriptors leaked");
    let big = raw_read(&mut keeper, 4, 0, 32 << 20);
    assert_eq!(&big[..region as usize], &old[..]);
    drop(keeper);
    let log = server.stop();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("connection dropped") || log.contains("connection closed"),
        "{log}"
    );
}

/// Reads until the server closes (plaintext: EOF; TLS: its `close_notify`), counting bytes.
/// `Err` if nothing closes within the read timeout, or a TLS stream ends without close_notify.
fn drain_to_close<S: Read>(s: &mut S) -> std::io::Result<usize> {
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n,
        }
    }
}

/// Many clients, plaintext and TLS, disconnect at once, repeatedly, each with replies still in
/// flight: `NBD_CMD_DISC` right behind four pipelined 256 KiB reads. Every connection must be
/// closed by the server within 10 s after delivering all four replies (TLS: with a
/// `close_notify`), and the server's descriptors return to where they were. A bench run once saw
/// a TLS connection that never finished closing (issue 13).
#[test]
fn many_tls_and_plain_clients_disconnecting_at_once_are_all_closed() {
    let dir = TempDir::new("disc-many");
    let Some(pki) = common::tls::pki(&dir, "pki") else {
        return;
    };
    let server = common::tls::start(&dir, &common::tls::tls_args(&pki, false, false));
    let pid = server.child.id();
    let baseline = fd_targets(pid).len();
    let ca = pki.join("ca-cert.pem");
    const EACH: usize = 8;
    const READ: u32 = 256 << 10;
    let requests = || {
        let mut b = Vec::new();
        for i in 0..4 {
            b.extend(raw_request(
                cmd::READ,
                i,
                u64::from(i as u32) * u64::from(READ),
                READ,
            ));
        }
        b.extend(raw_request(cmd::DISC, 99, 0, 0));
        b
    };
    let expected = 4 * (16 + READ as usize);
    for round in 0..10 {
        let barrier = std::sync::Barrier::new(2 * EACH);
        std::thread::scope(|scope| {
            for i in 0..2 * EACH {
                let (addr, ca, barrier) = (&server.addr, &ca, &barrier);
                scope.spawn(move || {
                    let tls = i % 2 == 1;
                    let what = if tls { "TLS" } else { "plaintext" };
                    let got = if tls {
                        let s = common::tls::plaintext(addr);
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        let mut t =
                            common::tls::starttls(s, &common::tls::ClientOpts::trusting(ca))
                                .unwrap();
                        assert_eq!(
                            common::tls::go(&mut t, "d").unwrap(),
                            nbdcrypt::protocol::consts::rep::ACK
                        );
                        barrier.wait();
                        t.write_all(&requests()).unwrap();
                        t.flush().unwrap();
                        drain_to_close(&mut t)
                    } else {
                        let mut s = raw_connect(addr, "d");
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        barrier.wait();
                        s.write_all(&requests()).unwrap();
                        drain_to_close(&mut s)
                    };
                    match got {
                        Ok(n) => {
                            assert_eq!(n, expected, "round {round}, {what}: bytes before close")
                        }
                        Err(e) => {
                            panic!("round {round}, {what} client {i}: not closed cleanly: {e}")
                        }
                    }
                });
            }
        });
    }
    // Every connection is gone on the server's side too.
    let start = std::time::Instant::now();
    while fd_targets(pid).len() > baseline && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        fd_targets(pid).len(),
        baseline,
        "descriptors left: {:?}",
        fd_targets(pid)
    );
    let mut s = raw_connect(&server.addr, "d");
    raw_write(&mut s, 1, 0, &[3u8; 4096], 0);
}
