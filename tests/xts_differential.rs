//! Differential tests: every backend against two independent implementations.
//!
//! * `xts-mode` (RustCrypto's reference XTS, one block per call) — in process, many cases.
//! * OpenSSL, through Python `cryptography` (`scripts/xts_oracle.py`, venv built by
//!   `scripts/test.sh`). The `openssl enc` command line is no oracle: OpenSSL 3.0's `enc`
//!   refuses XTS ciphers ("enc XTS ciphers not supported").
//!
//! Cases are random: keys, every sector size, runs of 1–150 sectors (crossing the portable
//! backend's 64-sector batch), and first sectors near 0, around 2^32 and near the top of the
//! 64-bit plain64 IV range. The seed is printed; `NBDCRYPT_TEST_SEED` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use aes::Aes256;
use aes::cipher::KeyInit;
use common::{Rng, peer_available, python, random_key, seed};
use nbdcrypt::crypto::{BackendChoice, BackendKind, SectorIndex, SectorSize, XtsEngine};
use xts_mode::{Xts128, get_tweak_default};

struct Case {
    raw_key: [u8; 64],
    engines: Vec<XtsEngine>,
    size: SectorSize,
    first: u64,
    plain: Vec<u8>,
}

impl Case {
    /// Names a failing case: backend, sector size and first sector.
    fn describe(&self, e: &XtsEngine) -> String {
        format!(
            "{} {}-byte sectors from {}",
            e.backend_kind(),
            self.size,
            self.first
        )
    }
}

fn first_sector(rng: &mut Rng, size: SectorSize, count: u64) -> u64 {
    // The largest first sector whose whole run still has 64-bit IVs.
    let max_first = u64::MAX / size.iv_units() - count;
    match rng.below(4) {
        0 => rng.below(1 << 20),
        1 => (1u64 << 32) - rng.below(64) + rng.below(64),
        2 => max_first - rng.below(1000),
        _ => rng.next_u64() % max_first,
    }
}

fn case(rng: &mut Rng) -> Case {
    let (key, raw_key) = random_key(rng);
    let size = SectorSize::ALL[usize::try_from(rng.below(4)).unwrap()];
    let count = 1 + rng.below(150);
    let first = first_sector(rng, size, count);
    let plain = rng.bytes(usize::try_from(count).unwrap() * size.bytes());
    let engines = BackendKind::available()
        .iter()
        .map(|&k| XtsEngine::new(&key, size, BackendChoice::Force(k)).unwrap())
        .collect();
    Case {
        raw_key,
        engines,
        size,
        first,
        plain,
    }
}

fn reference(raw_key: &[u8; 64], size: SectorSize, first: u64, data: &mut [u8], encrypt: bool) {
    let k1: &[u8; 32] = raw_key[..32].try_into().unwrap();
    let k2: &[u8; 32] = raw_key[32..].try_into().unwrap();
    let xts = Xts128::new(Aes256::new(k1.into()), Aes256::new(k2.into()));
    let units = u128::from(size.iv_units());
    let tweak = |i: u128| get_tweak_default(u128::from(first) * units + i * units);
    if encrypt {
        xts.encrypt_area(data, size.bytes(), 0, tweak);
    } else {
        xts.decrypt_area(data, size.bytes(), 0, tweak);
    }
}

#[test]
fn every_backend_matches_xts_mode_both_directions() {
    let mut rng = Rng::new(seed("xts-mode differential"));
    for _ in 0..150 {
        let c = case(&mut rng);
        let mut expected = c.plain.clone();
        reference(&c.raw_key, c.size, c.first, &mut expected, true);
        for e in &c.engines {
            let what = c.describe(e);
            let mut buf = c.plain.clone();
            e.encrypt_sectors(SectorIndex(c.first), &mut buf).unwrap();
            assert!(buf == expected, "encrypt in place: {what}");
            let mut out = vec![0u8; buf.len()];
            e.encrypt_sectors_to(SectorIndex(c.first), &c.plain, &mut out)
                .unwrap();
            assert!(out == expected, "encrypt out of place: {what}");
            e.decrypt_sectors(SectorIndex(c.first), &mut buf).unwrap();
            assert!(buf == c.plain, "decrypt in place: {what}");
            e.decrypt_sectors_to(SectorIndex(c.first), &expected, &mut out)
                .unwrap();
            assert!(out == c.plain, "decrypt out of place: {what}");
        }
        // And xts-mode decrypts what the engines wrote.
        let mut back = expected.clone();
        reference(&c.raw_key, c.size, c.first, &mut back, false);
        assert!(back == c.plain);
    }
}

fn python_oracle_available() -> Result<(), String> {
    let out = Command::new(python())
        .args(["-c", "import cryptography.hazmat.primitives.ciphers"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} has no `cryptography`: {}",
            python(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[test]
fn every_backend_matches_openssl_via_python_cryptography() {
    if !peer_available("python cryptography", python_oracle_available()) {
        return;
    }
    let mut rng = Rng::new(seed("python differential"));
    let cases: Vec<Case> = (0..120).map(|_| case(&mut rng)).collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/xts_oracle.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the oracle");
    let mut input = String::new();
    for c in &cases {
        // Ask for the encryption of the plaintext, and the decryption of the plaintext taken as
        // ciphertext: both directions are checked against OpenSSL independently.
        for op in ["enc", "dec"] {
            input += &format!(
                "{op} {} {} {} {} {}\n",
                hex::encode(c.raw_key),
                c.size.bytes(),
                u128::from(c.first) * u128::from(c.size.iv_units()),
                c.size.iv_units(),
                hex::encode(&c.plain)
            );
        }
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(output.status.success(), "oracle failed");
    let text = String::from_utf8(output.stdout).unwrap();
    let mut answers = text.lines();
    for c in &cases {
        let want_enc = hex::decode(answers.next().expect("enc answer")).unwrap();
        let want_dec = hex::decode(answers.next().expect("dec answer")).unwrap();
        for e in &c.engines {
            let what = c.describe(e);
            let mut buf = c.plain.clone();
            e.encrypt_sectors(SectorIndex(c.first), &mut buf).unwrap();
            assert!(buf == want_enc, "encrypt vs OpenSSL: {what}");
            let mut buf = c.plain.clone();
            e.decrypt_sectors(SectorIndex(c.first), &mut buf).unwrap();
            assert!(buf == want_dec, "decrypt vs OpenSSL: {what}");
        }
    }
    assert!(answers.next().is_none());
}
