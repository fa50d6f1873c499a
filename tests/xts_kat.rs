//! Known-answer tests: IEEE Std 1619-2007 Annex B, XTS-AES-256 vectors 10–14
//! (`tests/data/ieee1619-xts-aes-256.txt`), on every backend, both directions, in place and out
//! of place.
//!
//! The vectors' data unit sequence numbers (0xff … 0xffffffffff) are the plain64 sector numbers
//! of 512-byte sectors, so each vector is exactly one `encrypt_sectors` call.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use nbdcrypt::crypto::{BackendChoice, BackendKind, SectorIndex, SectorSize, VolumeKey, XtsEngine};

struct Vector {
    number: u32,
    key: Vec<u8>,
    dus: u64,
    ptx: Vec<u8>,
    ctx: Vec<u8>,
}

fn vectors() -> Vec<Vector> {
    let text = include_str!("data/ieee1619-xts-aes-256.txt");
    let mut out = Vec::new();
    let mut fields = std::collections::HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').expect("key = value");
        fields.insert(k.trim().to_owned(), v.trim().to_owned());
        if k.trim() == "ctx" {
            out.push(Vector {
                number: fields["vector"].parse().unwrap(),
                key: hex::decode(&fields["key"]).unwrap(),
                dus: u64::from_str_radix(&fields["dus"], 16).unwrap(),
                ptx: hex::decode(&fields["ptx"]).unwrap(),
                ctx: hex::decode(&fields["ctx"]).unwrap(),
            });
            fields.clear();
        }
    }
    assert_eq!(
        out.iter().map(|v| v.number).collect::<Vec<_>>(),
        vec![10, 11, 12, 13, 14]
    );
    out
}

fn engine(v: &Vector, kind: BackendKind) -> XtsEngine {
    let mut key = v.key.clone();
    let key = VolumeKey::take_from(&mut key).unwrap();
    XtsEngine::new(&key, SectorSize::S512, BackendChoice::Force(kind)).unwrap()
}

#[test]
fn ieee1619_vectors_10_to_14_encrypt_on_every_backend() {
    for kind in BackendKind::available() {
        for v in vectors() {
            let e = engine(&v, kind);
            let mut buf = v.ptx.clone();
            e.encrypt_sectors(SectorIndex(v.dus), &mut buf).unwrap();
            assert_eq!(
                hex::encode(&buf),
                hex::encode(&v.ctx),
                "vector {} on {kind}",
                v.number
            );
            let mut out = vec![0u8; v.ptx.len()];
            e.encrypt_sectors_to(SectorIndex(v.dus), &v.ptx, &mut out)
                .unwrap();
            assert_eq!(out, v.ctx, "vector {} out of place on {kind}", v.number);
        }
    }
}

#[test]
fn ieee1619_vectors_10_to_14_decrypt_on_every_backend() {
    for kind in BackendKind::available() {
        for v in vectors() {
            let e = engine(&v, kind);
            let mut buf = v.ctx.clone();
            e.decrypt_sectors(SectorIndex(v.dus), &mut buf).unwrap();
            assert_eq!(buf, v.ptx, "vector {} on {kind}", v.number);
            let mut out = vec![0u8; v.ctx.len()];
            e.decrypt_sectors_to(SectorIndex(v.dus), &v.ctx, &mut out)
                .unwrap();
            assert_eq!(out, v.ptx, "vector {} out of place on {kind}", v.number);
        }
    }
}

#[test]
fn ieee1619_vectors_as_two_sector_runs_match_per_vector_results() {
    // Vectors 10 and 11 are sectors 0xff and 0xffff; put each into a run whose first sector is
    // one earlier, so the vector is the *second* sector of a batch (exercises batching).
    for kind in BackendKind::available() {
        for v in vectors().into_iter().take(2) {
            let e = engine(&v, kind);
            let mut buf = vec![0u8; 1024];
            buf[512..].copy_from_slice(&v.ptx);
            e.encrypt_sectors(SectorIndex(v.dus - 1), &mut buf).unwrap();
            assert_eq!(&buf[512..], &v.ctx[..], "vector {} on {kind}", v.number);
        }
    }
}
