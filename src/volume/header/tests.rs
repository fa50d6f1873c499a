//! Header encoding, decoding, copy selection and the lease rule.

use super::*;

fn sample() -> Header {
    Header {
        sequence: 7,
        uuid: [9; 16],
        name: "scratch-1".into(),
        volume_type: VolumeType::Scratch,
        size: 1 << 30,
        sector_size: 4096,
        discards: true,
        deleted: false,
        created: 1_790_000_000,
        kms: "local".into(),
        key_id: "arn:nbdcrypt:kms:local:000000000000:key/1234".into(),
        wrapped_key: vec![0xAB; 180],
        context: vec![("nbdcrypt:volume-id".into(), "0909".into())],
        key_check: [3; 32],
        incomplete: false,
        progress: 0,
        lease: Some(Lease {
            node: "node-a".into(),
            pid: 4242,
            owner: 0x1234_5678_9abc_def0,
            started: 1_790_000_100,
            heartbeat_ms: 1_790_000_200_000,
            interval_ms: 10_000,
        }),
        rekey: None,
    }
}

/// Re-encodes `h`'s slot as format `version`, whose body is `drop` bytes shorter.
fn as_older(h: &Header, version: u16, drop: usize) -> Vec<u8> {
    let cur = h.encode().unwrap();
    let body = u32::from_be_bytes(cur[12..16].try_into().unwrap()) as usize;
    let old_body = body - drop;
    let mut old = cur[..old_body - 4].to_vec();
    old[8..10].copy_from_slice(&version.to_be_bytes());
    old[12..16].copy_from_slice(&u32::try_from(old_body).unwrap().to_be_bytes());
    let crc = crc32fast::hash(&old);
    old.extend_from_slice(&crc.to_be_bytes());
    old.resize(HEADER_COPY_BYTES, 0);
    old
}

#[test]
fn header_with_a_rekey_roundtrips_and_version_2_reads_without_one() {
    let mut h = sample();
    h.rekey = Some(Rekey {
        key_id: "arn:nbdcrypt:kms:local:000000000000:key/1234".into(),
        wrapped_key: vec![0xCD; 180],
        key_check: [5; 32],
        job: 77,
        started: 1_790_000_300,
    });
    assert_eq!(Header::decode(&h.encode().unwrap()).unwrap(), h);
    assert!(!format!("{h:?}").contains("205"), "no blob bytes in Debug");
    // Version 2 ends after the lease: no re-key state.
    let v2 = as_older(&sample(), 2, 1);
    assert_eq!(Header::decode(&v2).unwrap(), sample());
}

#[test]
fn header_roundtrips_and_fills_its_slot() {
    let h = sample();
    let slot = h.encode().unwrap();
    assert_eq!(slot.len(), HEADER_COPY_BYTES);
    assert_eq!(Header::decode(&slot).unwrap(), h);
}

#[test]
fn header_any_flipped_byte_is_detected() {
    let slot = sample().encode().unwrap();
    let body = u32::from_be_bytes(slot[12..16].try_into().unwrap()) as usize;
    for i in 0..body {
        let mut bad = slot.clone();
        bad[i] ^= 0x01;
        assert!(Header::decode(&bad).is_err(), "flip at {i} went unnoticed");
    }
}

#[test]
fn choose_prefers_newest_valid_copy_and_survives_one_damaged() {
    let old = sample();
    let mut new = sample();
    new.sequence = 8;
    let (a, b) = (old.encode().unwrap(), new.encode().unwrap());
    assert_eq!(choose([&a, &b]).unwrap().header.sequence, 8);
    let mut torn = b.clone();
    torn[100] ^= 0xff;
    let l = choose([&a, &torn]).unwrap();
    assert_eq!((l.header.sequence, l.slot), (7, 0));
    assert_eq!(l.damaged, Some(HeaderError::Checksum));
    let mut torn_a = a.clone();
    torn_a[50] ^= 1;
    assert!(choose([&torn_a, &torn]).is_err());
    assert!(matches!(
        choose([&[0u8; 4096], &[0u8; 4096]]),
        Err([HeaderError::Magic, HeaderError::Magic])
    ));
}

#[test]
fn header_arbitrary_bytes_never_panic() {
    let mut state = 12345u64;
    let good = sample().encode().unwrap();
    for i in 0..5000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut slot = good.clone();
        // Keep the magic sometimes so the parser goes deeper.
        let start = if i % 2 == 0 { 8 } else { 0 };
        for j in 0..8 {
            let pos = start + ((state >> (j * 8)) as usize % (HEADER_COPY_BYTES - start));
            slot[pos] = (state >> j) as u8;
        }
        let _ = Header::decode(&slot);
        let _ = Header::decode(&slot[..(state as usize % 200)]);
    }
}

#[test]
fn header_without_lease_and_incomplete_roundtrips() {
    let mut h = sample();
    h.lease = None;
    h.incomplete = true;
    h.progress = 6 << 30;
    assert_eq!(Header::decode(&h.encode().unwrap()).unwrap(), h);
}

/// A version-1 header (as written before leases existed) still opens: its body ends at the
/// key-check value, and it has no lease and no `incomplete` flag.
#[test]
fn header_version_1_is_still_read() {
    let mut h = sample();
    h.lease = None;
    // Version 2 appended progress (8) and the lease tag (1), version 3 the re-key tag (1).
    let v1 = as_older(&h, 1, 10);
    let v1_body = u32::from_be_bytes(v1[12..16].try_into().unwrap()) as usize;
    assert_eq!(Header::decode(&v1).unwrap(), h);
    // An unknown flag bit is refused rather than ignored.
    let mut bad = v1.clone();
    bad[41] |= 4;
    let crc = crc32fast::hash(&bad[..v1_body - 4]);
    bad[v1_body - 4..v1_body].copy_from_slice(&crc.to_be_bytes());
    assert!(matches!(
        Header::decode(&bad),
        Err(HeaderError::Malformed(_))
    ));
}

#[test]
fn lease_goes_stale_after_three_intervals() {
    let l = sample().lease.unwrap();
    let hb = l.heartbeat_ms;
    assert!(!l.is_stale(hb + 30_000));
    assert!(l.is_stale(hb + 30_001));
    assert!(
        !l.is_stale(hb - 5_000),
        "a clock behind the heartbeat is not staleness"
    );
}

#[test]
fn header_too_large_is_refused() {
    let mut h = sample();
    h.wrapped_key = vec![1; 5000];
    assert!(matches!(h.encode(), Err(HeaderError::TooLarge(_))));
}
