//! Property tests of the XTS engine, on every backend and sector size.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use nbdcrypt::crypto::{BackendChoice, BackendKind, SectorIndex, SectorSize, VolumeKey, XtsEngine};
use proptest::prelude::*;

fn key_from(mut raw: [u8; 64]) -> Option<VolumeKey> {
    VolumeKey::take_from(&mut raw).ok()
}

fn arb_key() -> impl Strategy<Value = [u8; 64]> {
    prop::array::uniform32(any::<u8>())
        .prop_flat_map(|a| (Just(a), prop::array::uniform32(any::<u8>())))
        .prop_map(|(a, b)| {
            let mut k = [0u8; 64];
            k[..32].copy_from_slice(&a);
            k[32..].copy_from_slice(&b);
            k
        })
        .prop_filter("halves must differ", |k| k[..32] != k[32..])
}

fn arb_size() -> impl Strategy<Value = SectorSize> {
    prop::sample::select(SectorSize::ALL.to_vec())
}

fn arb_backend() -> impl Strategy<Value = BackendKind> {
    prop::sample::select(BackendKind::available())
}

/// A first sector whose run of `max 8` sectors stays within the IV range.
fn arb_first(size: SectorSize) -> impl Strategy<Value = u64> {
    let max = u64::MAX / size.iv_units() - 8;
    prop_oneof![
        0..1u64 << 20,
        (1u64 << 32) - 8..(1u64 << 32) + 8,
        0..max,
        max - 8..max
    ]
}

fn arb_run() -> impl Strategy<Value = (SectorSize, u64, Vec<u8>)> {
    arb_size().prop_flat_map(|size| {
        (
            Just(size),
            arb_first(size),
            (1usize..=8)
                .prop_flat_map(move |n| prop::collection::vec(any::<u8>(), n * size.bytes())),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn decrypt_of_encrypt_is_identity(key in arb_key(), backend in arb_backend(), (size, first, plain) in arb_run()) {
        let key = key_from(key).unwrap();
        let e = XtsEngine::new(&key, size, BackendChoice::Force(backend)).unwrap();
        let mut buf = plain.clone();
        e.encrypt_sectors(SectorIndex(first), &mut buf).unwrap();
        prop_assert_ne!(&buf, &plain);
        e.decrypt_sectors(SectorIndex(first), &mut buf).unwrap();
        prop_assert_eq!(buf, plain);
    }

    #[test]
    fn backends_agree(key in arb_key(), (size, first, plain) in arb_run()) {
        let key = key_from(key).unwrap();
        let mut outs = Vec::new();
        for kind in BackendKind::available() {
            let e = XtsEngine::new(&key, size, BackendChoice::Force(kind)).unwrap();
            let mut buf = plain.clone();
            e.encrypt_sectors(SectorIndex(first), &mut buf).unwrap();
            outs.push(buf);
        }
        prop_assert!(outs.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn same_plaintext_in_two_sectors_differs(key in arb_key(), backend in arb_backend(), size in arb_size(), a in 0u64..1 << 40, delta in 1u64..1 << 20, block in prop::collection::vec(any::<u8>(), 16)) {
        let key = key_from(key).unwrap();
        let e = XtsEngine::new(&key, size, BackendChoice::Force(backend)).unwrap();
        // A plaintext sector of one repeated 16-byte block: equal blocks must still differ.
        let plain: Vec<u8> = block.iter().copied().cycle().take(size.bytes()).collect();
        let mut x = plain.clone();
        let mut y = plain.clone();
        e.encrypt_sectors(SectorIndex(a), &mut x).unwrap();
        e.encrypt_sectors(SectorIndex(a + delta), &mut y).unwrap();
        prop_assert_ne!(&x, &y);
        // Within one sector, equal plaintext blocks encrypt differently too.
        prop_assert_ne!(&x[..16], &x[16..32]);
    }

    #[test]
    fn wrong_key_never_round_trips(k1 in arb_key(), k2 in arb_key(), backend in arb_backend(), (size, first, plain) in arb_run()) {
        prop_assume!(k1 != k2);
        let right = XtsEngine::new(&key_from(k1).unwrap(), size, BackendChoice::Force(backend)).unwrap();
        let wrong = XtsEngine::new(&key_from(k2).unwrap(), size, BackendChoice::Force(backend)).unwrap();
        let mut buf = plain.clone();
        right.encrypt_sectors(SectorIndex(first), &mut buf).unwrap();
        wrong.decrypt_sectors(SectorIndex(first), &mut buf).unwrap();
        prop_assert_ne!(buf, plain);
    }

    #[test]
    fn wrong_sector_never_round_trips(key in arb_key(), backend in arb_backend(), (size, first, plain) in arb_run()) {
        let e = XtsEngine::new(&key_from(key).unwrap(), size, BackendChoice::Force(backend)).unwrap();
        let mut buf = plain.clone();
        e.encrypt_sectors(SectorIndex(first), &mut buf).unwrap();
        e.decrypt_sectors(SectorIndex(first ^ 1), &mut buf).unwrap();
        prop_assert_ne!(buf, plain);
    }
}
