use std::sync::Arc;

use super::*;
use crate::crypto::{BackendChoice, VolumeKey};
use crate::storage::MemoryStorage;

fn volume(size: u64, sector: SectorSize, discards: bool) -> (EncryptedVolume, Arc<MemoryStorage>) {
    let mut raw: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(13).wrapping_add(1))
        .collect();
    let key = VolumeKey::take_from(&mut raw).unwrap();
    let engine = XtsEngine::new(&key, sector, BackendChoice::Auto).unwrap();
    let mem = Arc::new(MemoryStorage::new(0));
    let v = EncryptedVolume::new(
        Box::new(Arc::clone(&mem)),
        engine,
        VolumeConfig {
            size,
            sector_size: sector,
            discards,
            read_only: false,
            data_offset: 0,
        },
    )
    .unwrap();
    (v, mem)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn span_splits_head_body_tail() {
    let s = Span::new(1000, 3000, 512);
    assert_eq!((s.first, s.count, s.head_skip), (1, 7, 488));
    assert!(s.head_partial && s.tail_partial);
    let s = Span::new(4096, 4096, 4096);
    assert!(!s.head_partial && !s.tail_partial);
    let s = Span::new(0, 100, 4096);
    assert!(s.head_partial && s.tail_partial && s.count == 1);
}

#[test]
fn volume_fresh_reads_zero() {
    let (v, _) = volume(1 << 20, SectorSize::S4096, false);
    let mut buf = vec![1u8; 10_000];
    v.read(12_345, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn volume_random_unaligned_ops_match_a_plaintext_model() {
    for sector in SectorSize::ALL {
        let size = 256 * 1024;
        let (v, mem) = volume(size, sector, true);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(0x1234_5678 ^ sector.bytes() as u64);
        for step in 0..300 {
            let off = rng.below(size - 1);
            let len = 1 + rng.below((size - off).min(20_000));
            let (o, l) = (off as usize, len as usize);
            match rng.below(4) {
                0 | 1 => {
                    let mut data: Vec<u8> = (0..l).map(|i| (i as u64 ^ step) as u8 | 1).collect();
                    model[o..o + l].copy_from_slice(&data);
                    v.write(off, &mut data, step % 7 == 0).unwrap();
                }
                2 => {
                    model[o..o + l].fill(0);
                    v.write_zeroes(off, len, step % 2 == 0, false, false)
                        .unwrap();
                }
                _ => {
                    let mut got = vec![0xEEu8; l];
                    v.read(off, &mut got).unwrap();
                    assert!(
                        got == model[o..o + l],
                        "{sector} step {step} read {off}+{len}"
                    );
                }
            }
        }
        let mut all = vec![0u8; size as usize];
        v.read(0, &mut all).unwrap();
        assert!(all == model, "{sector} final");
        // The backing store never holds a plaintext 16-byte block of the model's non-zero data.
        let raw = mem.snapshot();
        for w in model
            .chunks(16)
            .filter(|c| c.iter().any(|&b| b != 0))
            .take(200)
        {
            assert!(
                !raw.windows(16).any(|r| r == w),
                "{sector}: plaintext found in the backing store"
            );
        }
    }
}

#[test]
fn volume_concurrent_unaligned_writes_into_shared_sectors_lose_nothing() {
    // Eight threads each own every 8th 100-byte slot; slots cut across 512- and 4096-byte
    // sectors, so every sector is read-modify-written by several threads at once.
    for sector in [SectorSize::S512, SectorSize::S4096] {
        let (v, _) = volume(64 * 1024, sector, false);
        let v = Arc::new(v);
        let slots = 64 * 1024 / 100;
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let v = Arc::clone(&v);
                s.spawn(move || {
                    for round in 0..3u8 {
                        for slot in (usize::from(t)..slots).step_by(8) {
                            let mut data = vec![t.wrapping_mul(31).wrapping_add(round) | 1; 100];
                            v.write(slot as u64 * 100, &mut data, false).unwrap();
                        }
                    }
                });
            }
        });
        for slot in 0..slots {
            let t = (slot % 8) as u8;
            let mut got = vec![0u8; 100];
            v.read(slot as u64 * 100, &mut got).unwrap();
            assert!(
                got.iter()
                    .all(|&b| b == t.wrapping_mul(31).wrapping_add(2) | 1),
                "{sector} slot {slot}"
            );
        }
    }
}

#[test]
fn volume_trim_needs_discards_and_reads_zero() {
    let (v, _) = volume(1 << 20, SectorSize::S4096, false);
    assert!(matches!(
        v.trim(0, 8192, false),
        Err(VolumeError::Unsupported(_))
    ));
    let (v, mem) = volume(1 << 20, SectorSize::S4096, true);
    let mut data = vec![0xABu8; 65536];
    v.write(0, &mut data, false).unwrap();
    v.trim(1000, 20_000, false).unwrap();
    let mut got = vec![0u8; 65536];
    v.read(0, &mut got).unwrap();
    // Whole sectors 1..=4 (4096..20480) are discarded; the partial edges are kept.
    assert!(got[..4096].iter().all(|&b| b == 0xAB));
    assert!(got[4096..20480].iter().all(|&b| b == 0));
    assert!(got[20480..].iter().all(|&b| b == 0xAB));
    assert!(mem.snapshot()[4096..20480].iter().all(|&b| b == 0));
}

#[test]
fn volume_fast_zero_without_discards_is_unsupported_and_touches_nothing() {
    let (v, _) = volume(1 << 20, SectorSize::S512, false);
    let mut data = vec![7u8; 4096];
    v.write(0, &mut data, false).unwrap();
    assert!(matches!(
        v.write_zeroes(0, 4096, true, true, false),
        Err(VolumeError::Unsupported(_))
    ));
    let mut got = vec![0u8; 4096];
    v.read(0, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == 7));
}

#[test]
fn volume_out_of_range_and_read_only_are_refused() {
    let (v, _) = volume(1 << 20, SectorSize::S512, false);
    let mut buf = vec![0u8; 10];
    assert!(matches!(
        v.read((1 << 20) - 5, &mut buf),
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write(u64::MAX - 2, &mut buf, false),
        Err(VolumeError::OutOfRange { .. })
    ));
}
