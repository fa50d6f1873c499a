//! One engine shared by many threads at once gives the same bytes as one thread.
//!
//! More threads than the `hw` backend has context slots, so some requests also run on
//! temporary contexts; every thread checks its results against an engine of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{Rng, random_key, seed};
use nbdcrypt::crypto::{BackendChoice, BackendKind, SectorIndex, SectorSize, XtsEngine};

#[test]
fn shared_engine_under_many_threads_matches_single_thread() {
    let base = seed("concurrency");
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()) * 2 + 70;
    for kind in BackendKind::available() {
        let mut rng = Rng::new(base);
        let (key, raw) = random_key(&mut rng);
        let engine =
            Arc::new(XtsEngine::new(&key, SectorSize::S512, BackendChoice::Force(kind)).unwrap());
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let engine = Arc::clone(&engine);
                let mut rng = Rng::new(base ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9));
                std::thread::spawn(move || {
                    // Reference: an engine of this thread's own, never shared.
                    let mut own_key = raw;
                    let own_key = nbdcrypt::crypto::VolumeKey::take_from(&mut own_key).unwrap();
                    let own =
                        XtsEngine::new(&own_key, SectorSize::S512, BackendChoice::Force(kind))
                            .unwrap();
                    for round in 0..20u64 {
                        let sectors = 1 + usize::try_from(rng.below(40)).unwrap();
                        let first = rng.below(1 << 40);
                        let plain = rng.bytes(sectors * 512);
                        let mut buf = plain.clone();
                        engine
                            .encrypt_sectors(SectorIndex(first), &mut buf)
                            .unwrap();
                        let mut expected = vec![0u8; plain.len()];
                        own.encrypt_sectors_to(SectorIndex(first), &plain, &mut expected)
                            .unwrap();
                        assert!(buf == expected, "thread {t} round {round}");
                        engine
                            .decrypt_sectors(SectorIndex(first), &mut buf)
                            .unwrap();
                        assert_eq!(buf, plain, "thread {t} round {round}");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("worker thread");
        }
    }
}
