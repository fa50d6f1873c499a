//! A request split across the crypto workers produces exactly the bytes of the single-threaded
//! path: the same ciphertext in the store after writes, the same plaintext from reads. Every
//! sector size, aligned and unaligned (partial head and tail sectors) requests, requests that
//! start and end inside one sector run, and splits into up to ten runs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::sync::Arc;

use nbdcrypt::crypto::SectorSize;
use nbdcrypt::server::workers::{MIN_RUN_BYTES, Workers, split};
use nbdcrypt::storage::MemoryStorage;
use nbdcrypt::volume::EncryptedVolume;

use common::{Rng, test_volume};

const SIZE: u64 = 8 << 20;

fn volume(sector: SectorSize) -> (EncryptedVolume, Arc<MemoryStorage>) {
    // Both volumes of a pair get the same fixed test key.
    let mem = Arc::new(MemoryStorage::new(0));
    let bytes = sector.bytes() as u64;
    (test_volume(Box::new(Arc::clone(&mem)), SIZE, bytes), mem)
}

/// (offset, len) pairs: aligned, unaligned at either or both ends, and tiny edges.
fn requests(sector: u64, rng: &mut Rng) -> Vec<(u64, usize)> {
    let mut out = vec![
        (0, 1 << 20),
        (sector, (1 << 20) + sector as usize),
        (1, (1 << 20) - 2),
        (sector - 1, 3 * MIN_RUN_BYTES + 2),
        (5 * sector + 17, 700_001),
        (SIZE - (2 << 20) - 3, (2 << 20) + 3),
        (3 * sector, 4 * MIN_RUN_BYTES),
    ];
    for _ in 0..12 {
        let len = (2 * MIN_RUN_BYTES as u64 + rng.below(3 << 20)) as usize;
        let offset = rng.below(SIZE - len as u64);
        out.push((offset, len));
    }
    out
}

#[test]
fn split_requests_match_single_threaded_path_for_every_sector_size() {
    let workers = Workers::new(4, 1).unwrap();
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    for bytes in [512u64, 1024, 2048, 4096] {
        let sector = SectorSize::from_bytes(bytes).unwrap();
        let (split_vol, split_mem) = volume(sector);
        let (single_vol, single_mem) = volume(sector);
        for (offset, len) in requests(bytes, &mut rng) {
            let runs = split(
                offset,
                len,
                bytes as usize,
                workers.threads() * 2,
                MIN_RUN_BYTES,
            );
            assert!(runs.len() > 1, "{offset}+{len} must really be split");
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            let mut a = data.clone();
            let mut b = data.clone();
            workers.write(&split_vol, offset, &mut a, false).unwrap();
            single_vol.write(offset, &mut b, false).unwrap();
            assert!(
                split_mem.snapshot() == single_mem.snapshot(),
                "ciphertext differs after a {len}-byte write at {offset} ({bytes}-byte sectors)"
            );
            // Reads: split, single, and the bytes written.
            let mut via_split = vec![0xAAu8; len];
            let mut via_single = vec![0x55u8; len];
            workers.read(&split_vol, offset, &mut via_split).unwrap();
            single_vol.read(offset, &mut via_single).unwrap();
            assert!(
                via_split == via_single && via_split == data,
                "read of {offset}+{len}"
            );
            // A split read of a range straddling this write and older data.
            let o2 = offset.saturating_sub(bytes + 3);
            let l2 = (len + 2 * bytes as usize + 5).min((SIZE - o2) as usize);
            let mut r1 = vec![0u8; l2];
            let mut r2 = vec![1u8; l2];
            workers.read(&split_vol, o2, &mut r1).unwrap();
            single_vol.read(o2, &mut r2).unwrap();
            assert!(
                r1 == r2,
                "straddling read of {o2}+{l2} ({bytes}-byte sectors)"
            );
        }
        // FUA through the split path flushes and keeps the bytes.
        let mut d = vec![7u8; 3 * MIN_RUN_BYTES];
        let mut e = d.clone();
        workers.write(&split_vol, 4096, &mut d, true).unwrap();
        single_vol.write(4096, &mut e, true).unwrap();
        assert!(split_mem.snapshot() == single_mem.snapshot());
    }
}

#[test]
fn split_concurrent_disjoint_writes_match_sequential_writes() {
    // Several split requests in flight at once (as from pipelined clients), over disjoint
    // ranges that share edge sectors' neighbours: the result equals applying them one by one.
    let workers = Arc::new(Workers::new(4, 1).unwrap());
    let sector = SectorSize::from_bytes(512).unwrap();
    let (par_vol, par_mem) = volume(sector);
    let (seq_vol, seq_mem) = volume(sector);
    let par_vol = Arc::new(par_vol);
    let mut rng = Rng::new(42);
    let mut jobs = Vec::new();
    let mut at = 3u64;
    for _ in 0..8 {
        let len = 200_000 + rng.below(300_000) as usize;
        let mut d = vec![0u8; len];
        rng.fill(&mut d);
        jobs.push((at, d));
        at += len as u64 + rng.below(700);
    }
    std::thread::scope(|s| {
        for (off, d) in &jobs {
            let (w, v) = (Arc::clone(&workers), Arc::clone(&par_vol));
            let mut d = d.clone();
            let off = *off;
            s.spawn(move || w.write(&v, off, &mut d, false).unwrap());
        }
    });
    for (off, d) in &jobs {
        seq_vol.write(*off, &mut d.clone(), false).unwrap();
    }
    assert!(par_mem.snapshot() == seq_mem.snapshot());
}
