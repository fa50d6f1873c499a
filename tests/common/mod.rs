//! Helpers shared by the integration tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use nbdcrypt::crypto::VolumeKey;

/// `NBDCRYPT_REQUIRE_PEERS=1` (set by `scripts/test.sh` and CI): a missing peer is a failure.
pub fn peers_required() -> bool {
    std::env::var("NBDCRYPT_REQUIRE_PEERS").is_ok_and(|v| v == "1")
}

/// Decides what to do about a missing peer: panic when peers are required, otherwise print
/// why the test is skipped and return `false`.
pub fn peer_available(name: &str, available: Result<(), String>) -> bool {
    match available {
        Ok(()) => true,
        Err(why) if peers_required() => {
            panic!("peer `{name}` is required (NBDCRYPT_REQUIRE_PEERS=1) but unavailable: {why}")
        }
        Err(why) => {
            eprintln!(
                "SKIPPED: peer `{name}` unavailable ({why}); set NBDCRYPT_REQUIRE_PEERS=1 to fail instead"
            );
            false
        }
    }
}

/// The Python interpreter of the test venv (`NBDCRYPT_PYTHON`), or `python3`.
pub fn python() -> String {
    std::env::var("NBDCRYPT_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A deterministic xorshift generator, so failures reproduce from the printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// A random key with distinct halves, and a copy of its bytes for the reference implementations.
pub fn random_key(rng: &mut Rng) -> (VolumeKey, [u8; 64]) {
    let mut raw = [0u8; 64];
    rng.fill(&mut raw);
    let copy = raw;
    (
        VolumeKey::take_from(&mut raw).expect("random halves differ"),
        copy,
    )
}

/// A seed from the environment (`NBDCRYPT_TEST_SEED`) or the clock; printed so a failure can be
/// replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("NBDCRYPT_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() ^ u64::from(d.subsec_nanos()))
                .unwrap_or(42)
        });
    eprintln!("{test}: NBDCRYPT_TEST_SEED={s}");
    s
}
