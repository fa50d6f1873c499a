//! No stripe lock is held across a call into the crypto worker pool (issue 13, point 7).
//!
//! On a block device large writes run on the workers. An aligned one used to take its stripe
//! locks (shared) and then run its parallel encryption in the pool; a worker waiting inside
//! that join could steal another queued request, an unaligned large write needing one of those
//! stripes exclusively, and block on a lock its own stack held: a deadlock. Here four
//! connections pipeline large aligned and unaligned writes into slots laid so that every slot
//! boundary shares a sector (and so a stripe) with the next slot, for a bounded number of
//! time; every request must be answered within the socket timeout (no hang), and at the end
//! every byte must read as the model says: each slot holds its owner's last value.
//! Needs root (loop device).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::io::{Read, Write};

use common::*;
use nbdcrypt::protocol::consts::cmd;

const CONNS: u64 = 4;
/// Aligned slots (512 KiB at 4 KiB boundaries) alternate with unaligned ones (200 KiB + 1234
/// bytes), so each unaligned slot's first and last sectors are shared with its neighbours.
const ALIGNED: u64 = 512 << 10;
const UNALIGNED: u64 = (200 << 10) + 1234;
const PAIRS: u64 = 16;

/// Slot `k`: (offset, length). Even slots aligned, odd ones unaligned, packed back to back
/// (aligned slots start on the next 4 KiB boundary; the gap bytes stay zero).
fn slots() -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for _ in 0..PAIRS {
        at = at.div_ceil(4096) * 4096;
        out.push((at, ALIGNED));
        at += ALIGNED;
        out.push((at, UNALIGNED));
        at += UNALIGNED;
    }
    out
}

fn value(slot: usize, round: u64) -> u8 {
    (slot as u64 * 37 + round * 11 + 3) as u8 | 1
}

fn prerequisites() -> Result<(), String> {
    have("losetup")?;
    if run_ok(std::process::Command::new("id").arg("-u")).trim() != "0" {
        return Err("needs root for losetup".into());
    }
    Ok(())
}

#[test]
fn pool_large_aligned_and_unaligned_writes_never_deadlock() {
    if !peer_available("losetup (root)", prerequisites()) {
        return;
    }
    let dir = TempDir::new("pool-locks");
    let slots = slots();
    let size = (slots.last().map_or(0, |(o, l)| o + l).div_ceil(1 << 20) + 1) << 20;
    let img = dir.path("dev.img");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let dev = LoopDev::attach(&img);
    let mut rng = Rng::new(seed("pool locks"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let spec = format!("name=d,file={},key-file={}", dev.0, key.display());
    // Two workers, split at 128 KiB: every slot write goes to the pool and is split.
    let server = Server::start_with(&dir, &[spec], &["--workers", "2"]);
    let addr = server.addr.clone();
    let slots_ref = &slots;
    // Each connection writes its slots one request at a time in random order until the time
    // is up: with few requests queued the pool splits each large write (and joins), while the
    // other connections' requests arrive and queue behind the joins. Bounded: 8 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    let last: Vec<std::sync::atomic::AtomicU64> = (0..slots.len())
        .map(|_| std::sync::atomic::AtomicU64::new(u64::MAX))
        .collect();
    let last_ref = &last;
    std::thread::scope(|scope| {
        for conn in 0..CONNS {
            let addr = addr.clone();
            scope.spawn(move || {
                let mut s = raw_connect(&addr, "d");
                s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
                    .unwrap();
                let mut rng = Rng::new(seed("pool locks") ^ (conn + 1));
                let mine: Vec<usize> = (0..slots_ref.len())
                    .filter(|k| *k as u64 % CONNS == conn)
                    .collect();
                let mut round = 0u64;
                while std::time::Instant::now() < deadline {
                    // Two distinct slots in flight at once (pipelined: the pool takes them), half
                    // of the writes with FUA (run from the blocking pool, split into the workers).
                    let a = mine[rng.below(mine.len() as u64) as usize];
                    let mut b = mine[rng.below(mine.len() as u64) as usize];
                    if b == a {
                        b = mine[(mine.iter().position(|&x| x == a).unwrap() + 1) % mine.len()];
                    }
                    let mut batch = Vec::new();
                    for k in [a, b] {
                        let (off, len) = slots_ref[k];
                        let mut req = raw_request(cmd::WRITE, round, off, len as u32);
                        if rng.below(2) == 0 {
                            req[4..6].copy_from_slice(
                                &nbdcrypt::protocol::consts::cmd_flag::FUA.to_be_bytes(),
                            );
                        }
                        req.extend(std::iter::repeat_n(value(k, round), len as usize));
                        batch.extend_from_slice(&req);
                    }
                    s.write_all(&batch).unwrap();
                    for _ in 0..2 {
                        let mut h = [0u8; 16];
                        s.read_exact(&mut h)
                            .expect("a reply within 60 s (a hang means a deadlock)");
                        assert_eq!(&h[4..8], &[0; 4], "write failed");
                    }
                    for k in [a, b] {
                        last_ref[k].store(round, std::sync::atomic::Ordering::Relaxed);
                    }
                    round += 1;
                }
            });
        }
    });
    // The model: every slot holds its owner's last value; the gaps are zero.
    let mut s = raw_connect(&server.addr, "d");
    let mut expect = vec![0u8; size as usize];
    for (k, &(off, len)) in slots.iter().enumerate() {
        let r = last[k].load(std::sync::atomic::Ordering::Relaxed);
        if r != u64::MAX {
            expect[off as usize..(off + len) as usize].fill(value(k, r));
        }
    }
    let mut at = 0u64;
    while at < size {
        let n = (8u64 << 20).min(size - at);
        let got = raw_read(&mut s, 9, at, n as u32);
        if got[..] != expect[at as usize..(at + n) as usize] {
            let i = got
                .iter()
                .zip(&expect[at as usize..])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!("byte {} differs from the model", at + i as u64);
        }
        at += n;
    }
    let log = server.stop();
    assert!(log.contains("workers="), "{log}");
}
