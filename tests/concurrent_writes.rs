//! Concurrent unaligned writes from several connections never lose an update. Four
//! connections own interleaved 100-byte slots of the same 4 KiB (and 512 B) sectors, so every
//! sector is read-modify-written by all of them at once; each pipelines its slots in a random
//! order for several rounds with a new value per round. The model: every slot ends with its
//! owner's last value, and bytes outside the slots stay zero.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::io::{Read, Write};

use common::*;
use nbdcrypt::protocol::consts::cmd;

const SLOT: u64 = 100;
const SLOTS: u64 = 1200; // 120 000 bytes: 30 sectors of 4 KiB, 235 of 512 B
const CONNS: u64 = 4;
const ROUNDS: u64 = 3;
const BASE: u64 = 12_345; // unaligned start

fn value(conn: u64, slot: u64, round: u64) -> u8 {
    (conn * 61 + slot * 7 + round * 29 + 1) as u8 | 1
}

fn run(addr: &str, export: &str) {
    std::thread::scope(|scope| {
        for conn in 0..CONNS {
            scope.spawn(move || {
                let mut s = raw_connect(addr, export);
                let mut rng = Rng::new(seed("concurrent") ^ conn);
                for round in 0..ROUNDS {
                    let mut mine: Vec<u64> = (0..SLOTS).filter(|k| k % CONNS == conn).collect();
                    for i in (1..mine.len()).rev() {
                        let j = rng.below(i as u64 + 1) as usize;
                        mine.swap(i, j);
                    }
                    // Pipeline the whole round, then collect the replies.
                    let mut batch = Vec::new();
                    for &k in &mine {
                        batch.extend(raw_request(cmd::WRITE, k, BASE + k * SLOT, SLOT as u32));
                        batch.extend(std::iter::repeat_n(value(conn, k, round), SLOT as usize));
                    }
                    s.write_all(&batch).unwrap();
                    for _ in &mine {
                        let mut reply = [0u8; 16];
                        s.read_exact(&mut reply).unwrap();
                        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "write failed");
                    }
                }
            });
        }
    });
    // Read everything back, with a margin on both sides.
    let mut s = raw_connect(addr, export);
    let start = BASE - 1000;
    let len = SLOTS * SLOT + 2000;
    s.write_all(&raw_request(cmd::READ, 1, start, len as u32))
        .unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &[0, 0, 0, 0]);
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    for (i, &b) in data.iter().enumerate() {
        let at = start + i as u64;
        let want = if (BASE..BASE + SLOTS * SLOT).contains(&at) {
            let k = (at - BASE) / SLOT;
            value(k % CONNS, k, ROUNDS - 1)
        } else {
            0
        };
        assert_eq!(
            b,
            want,
            "{export}: byte {at} (slot {})",
            at.saturating_sub(BASE) / SLOT
        );
    }
}

#[test]
fn concurrent_unaligned_writes_from_four_connections_lose_nothing() {
    let dir = TempDir::new("concurrent");
    let server = Server::start(
        &dir,
        &[
            keyed_export(&dir, "s4k", ",size=4M"),
            keyed_export(&dir, "s512", ",size=4M,sector-size=512"),
        ],
    );
    run(&server.addr, "s4k");
    run(&server.addr, "s512");
}
