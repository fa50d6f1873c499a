//! [`VolumeKey`]: a volume's 512-bit XTS data key, the only type that holds raw key bytes.
//!
//! The bytes live in a [`LockedBox`]: locked against swap, excluded from core dumps, and wiped
//! before the pages are released. The type has no `Clone`, no `Display`, and a `Debug` that
//! prints neither the bytes nor anything derived from them.

use zeroize::Zeroize;

use super::CryptoError;
use super::locked::{LockedBox, Protection};

/// Length of a volume data key: two AES-256 keys (data half K1, tweak half K2).
pub const VOLUME_KEY_BYTES: usize = 64;

/// A volume's XTS-AES-256 data key.
pub struct VolumeKey {
    bytes: LockedBox<[u8; VOLUME_KEY_BYTES]>,
}

impl VolumeKey {
    /// Copies a key into protected memory and wipes `source`.
    ///
    /// Refuses keys that are not 64 bytes, and keys whose halves are equal (XTS with K1 = K2 is
    /// weak, and IEEE 1619-2018 and FIPS forbid it).
    pub fn take_from(source: &mut [u8]) -> Result<Self, CryptoError> {
        let result = Self::copy_from(source);
        source.zeroize();
        result
    }

    fn copy_from(source: &[u8]) -> Result<Self, CryptoError> {
        if source.len() != VOLUME_KEY_BYTES {
            return Err(CryptoError::KeyLength {
                got: source.len(),
                want: VOLUME_KEY_BYTES,
            });
        }
        let bytes = LockedBox::new_with(|slot| {
            let dst = slot.write([0u8; VOLUME_KEY_BYTES]);
            dst.copy_from_slice(source);
        })?;
        let key = VolumeKey { bytes };
        if key.halves_equal() {
            return Err(CryptoError::EqualKeyHalves);
        }
        Ok(key)
    }

    /// A fresh random key from the operating system's CSPRNG, written straight into protected
    /// memory.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut failure = None;
        let bytes = LockedBox::new_with(|slot| {
            let dst = slot.write([0u8; VOLUME_KEY_BYTES]);
            if let Err(e) = getrandom::fill(dst) {
                failure = Some(e);
            }
        })?;
        if let Some(e) = failure {
            return Err(CryptoError::Randomness(e.to_string()));
        }
        let key = VolumeKey { bytes };
        if key.halves_equal() {
            // 2^-256 for a working CSPRNG: a broken one must not go unnoticed.
            return Err(CryptoError::EqualKeyHalves);
        }
        Ok(key)
    }

    /// What the OS granted for the key's pages. Callers log a warning when it is not full.
    pub fn protection(&self) -> Protection {
        self.bytes.protection()
    }

    /// The data half (K1) and the tweak half (K2).
    pub(crate) fn halves(&self) -> (&[u8; 32], &[u8; 32]) {
        let (k1, k2) = self.bytes.split_at(32);
        match (k1.try_into(), k2.try_into()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => unreachable!("a 64-byte array splits into two 32-byte halves"),
        }
    }

    /// All 64 bytes, K1 then K2.
    pub(crate) fn expose(&self) -> &[u8; VOLUME_KEY_BYTES] {
        &self.bytes
    }

    /// Constant-time comparison of the halves: the time taken reveals nothing about the key.
    fn halves_equal(&self) -> bool {
        let (k1, k2) = self.halves();
        std::hint::black_box(crate::codec::ct_eq(k1, k2))
    }

    #[cfg(test)]
    pub(crate) fn retain_pages_after_drop(&mut self) -> (*const u8, usize) {
        self.bytes.retain_pages_after_drop()
    }
}

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeKey")
            .field("bytes", &"[REDACTED]")
            .field("protection", &self.protection())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern() -> [u8; 64] {
        let mut k = [0u8; 64];
        for (i, b) in k.iter_mut().enumerate() {
            *b = 0x40 + u8::try_from(i).unwrap();
        }
        k
    }

    #[test]
    fn volume_key_take_from_wipes_source() {
        let mut src = pattern();
        let key = VolumeKey::take_from(&mut src).unwrap();
        assert_eq!(src, [0u8; 64]);
        assert_eq!(key.expose(), &pattern());
    }

    #[test]
    fn volume_key_wrong_length_is_refused() {
        let mut src = [1u8; 32];
        let err = VolumeKey::take_from(&mut src).unwrap_err();
        assert!(matches!(err, CryptoError::KeyLength { got: 32, want: 64 }));
        assert_eq!(src, [0u8; 32], "even a refused key is wiped");
    }

    #[test]
    fn volume_key_equal_halves_are_refused() {
        let mut src = [0x5Au8; 64];
        assert!(matches!(
            VolumeKey::take_from(&mut src),
            Err(CryptoError::EqualKeyHalves)
        ));
    }

    #[test]
    fn volume_key_debug_is_redacted() {
        let mut src = pattern();
        let key = VolumeKey::take_from(&mut src).unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains("REDACTED"), "{shown}");
        let hex: String = pattern().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(&hex[..8]), "{shown}");
        assert!(!shown.contains("64, 65, 66"), "{shown}");
    }

    #[test]
    fn volume_key_generate_gives_distinct_keys() {
        let a = VolumeKey::generate().unwrap();
        let b = VolumeKey::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    #[allow(unsafe_code)]
    fn volume_key_dropped_leaves_no_copy_in_its_memory() {
        let mut src = pattern();
        let mut key = VolumeKey::take_from(&mut src).unwrap();
        let (ptr, len) = key.retain_pages_after_drop();
        // SAFETY: the mapping is alive and holds the key right now.
        let before = unsafe { std::slice::from_raw_parts(ptr, len) };
        assert!(
            before.windows(64).any(|w| w == pattern()),
            "the test must look where the key really is"
        );
        drop(key);
        // SAFETY: retain_pages_after_drop left the mapping in place (leaked) for this read.
        let after = unsafe { std::slice::from_raw_parts(ptr, len) };
        assert!(after.iter().all(|&b| b == 0), "key bytes survived drop");
    }
}
