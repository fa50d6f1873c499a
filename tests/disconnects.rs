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
