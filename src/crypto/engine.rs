//! [`XtsEngine`]: one volume's key, sector size and backend; validates every request once.

use std::fmt;

use super::{
    BackendChoice, BackendKind, CryptoError, Protection, SectorIndex, SectorSize, VolumeKey, hw,
    portable,
};
#[cfg(target_arch = "x86_64")]
use super::{vaes, vaes256};

/// A validated run of whole sectors handed to a backend.
pub(crate) struct SectorRun<'s, 'd> {
    /// plain64 IV (512-byte units) of the first sector.
    pub(crate) first_iv_sector: u64,
    /// IV increment per sector.
    pub(crate) iv_step: u64,
    /// Bytes per sector.
    pub(crate) sector_bytes: usize,
    /// Source, or `None` for in place.
    pub(crate) src: Option<&'s [u8]>,
    /// Destination (and source when in place).
    pub(crate) dst: &'d mut [u8],
}

enum Backend {
    Hw(hw::HwXts),
    Portable(portable::PortableXts),
    #[cfg(target_arch = "x86_64")]
    Vaes(vaes::VaesXts),
    #[cfg(target_arch = "x86_64")]
    Vaes256(vaes256::Vaes256Xts),
}

/// XTS-AES-256 for one volume: a key, a sector size and a backend.
///
/// It is `Sync`: many threads may encrypt and decrypt through one engine at once.
pub struct XtsEngine {
    sector_size: SectorSize,
    backend: Backend,
}

impl fmt::Debug for XtsEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XtsEngine")
            .field("sector_size", &self.sector_size)
            .field("backend", &self.backend_kind())
            .finish_non_exhaustive()
    }
}

impl XtsEngine {
    /// Builds an engine for `key`. The key schedules are expanded now, into protected memory;
    /// `key` itself may be dropped afterwards.
    pub fn new(
        key: &VolumeKey,
        sector_size: SectorSize,
        choice: BackendChoice,
    ) -> Result<Self, CryptoError> {
        let backend = match choice.resolve(sector_size) {
            BackendKind::Hw => Backend::Hw(hw::HwXts::new(key.expose())?),
            BackendKind::Portable => {
                let (k1, k2) = key.halves();
                Backend::Portable(portable::PortableXts::new(k1, k2)?)
            }
            #[cfg(target_arch = "x86_64")]
            BackendKind::Vaes => {
                let (k1, k2) = key.halves();
                Backend::Vaes(vaes::VaesXts::new(k1, k2)?)
            }
            #[cfg(target_arch = "x86_64")]
            BackendKind::Vaes256 => {
                let (k1, k2) = key.halves();
                Backend::Vaes256(vaes256::Vaes256Xts::new(k1, k2)?)
            }
            #[cfg(not(target_arch = "x86_64"))]
            kind @ (BackendKind::Vaes | BackendKind::Vaes256) => {
                return Err(CryptoError::Unavailable {
                    backend: kind.name(),
                    reason: "needs x86_64",
                });
            }
        };
        Ok(XtsEngine {
            sector_size,
            backend,
        })
    }

    /// One line for a startup log: backend, its code path on this CPU, sector size, and what
    /// the OS granted for the key-schedule pages. Contains no key material.
    pub fn summary(&self) -> String {
        let kind = self.backend_kind();
        let p = self.protection();
        format!(
            "aes-xts-plain64 backend={} ({}) sector_bytes={} key_memory={}{}",
            kind,
            kind.path(),
            self.sector_size.bytes(),
            if p.locked { "locked" } else { "UNLOCKED" },
            if p.excluded_from_dumps {
                ",no-dump"
            } else {
                ",DUMPABLE"
            },
        )
    }

    /// A key-check value: the first 32 bytes of the encryption of a zero sector at the last
    /// sector index whose IV fits 64 bits — a position no volume reaches, so the value never
    /// equals any stored data. It identifies the key without revealing it (one known
    /// plaintext/ciphertext pair under a tweak that is never used for data).
    pub fn key_check_value(&self) -> Result<[u8; 32], CryptoError> {
        let mut sector = vec![0u8; self.sector_size.bytes()];
        let last = u64::MAX / self.sector_size.iv_units();
        self.encrypt_sectors(SectorIndex(last), &mut sector)?;
        let mut kcv = [0u8; 32];
        kcv.copy_from_slice(&sector[..32]);
        Ok(kcv)
    }

    /// The backend in use.
    pub fn backend_kind(&self) -> BackendKind {
        match self.backend {
            Backend::Hw(_) => BackendKind::Hw,
            Backend::Portable(_) => BackendKind::Portable,
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes(_) => BackendKind::Vaes,
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes256(_) => BackendKind::Vaes256,
        }
    }

    /// The sector size.
    pub fn sector_size(&self) -> SectorSize {
        self.sector_size
    }

    /// What the OS granted for the pages holding the expanded key schedules.
    pub fn protection(&self) -> Protection {
        match &self.backend {
            Backend::Hw(h) => h.protection(),
            Backend::Portable(p) => p.protection(),
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes(v) => v.protection(),
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes256(v) => v.protection(),
        }
    }

    /// Encrypts `buf` in place; `buf` holds whole sectors starting at sector `first`.
    pub fn encrypt_sectors(&self, first: SectorIndex, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.run(first, None, buf, true)
    }

    /// Decrypts `buf` in place; `buf` holds whole sectors starting at sector `first`.
    pub fn decrypt_sectors(&self, first: SectorIndex, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.run(first, None, buf, false)
    }

    /// Encrypts `src` into `dst` (same length) without touching `src`: one pass, no extra copy.
    pub fn encrypt_sectors_to(
        &self,
        first: SectorIndex,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.run(first, Some(src), dst, true)
    }

    /// Decrypts `src` into `dst` (same length) without touching `src`.
    pub fn decrypt_sectors_to(
        &self,
        first: SectorIndex,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.run(first, Some(src), dst, false)
    }

    fn run(
        &self,
        first: SectorIndex,
        src: Option<&[u8]>,
        dst: &mut [u8],
        encrypt: bool,
    ) -> Result<(), CryptoError> {
        let run = self.validate(first, src, dst)?;
        if run.dst.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::Hw(h) => h.process(run, encrypt),
            Backend::Portable(p) => {
                p.process(run, encrypt);
                Ok(())
            }
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes(v) => {
                v.process(run, encrypt);
                Ok(())
            }
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes256(v) => {
                v.process(run, encrypt);
                Ok(())
            }
        }
    }

    /// Checks lengths and the IV range once, before any backend sees the buffers.
    fn validate<'s, 'd>(
        &self,
        first: SectorIndex,
        src: Option<&'s [u8]>,
        dst: &'d mut [u8],
    ) -> Result<SectorRun<'s, 'd>, CryptoError> {
        let sector_bytes = self.sector_size.bytes();
        if let Some(s) = src
            && s.len() != dst.len()
        {
            return Err(CryptoError::LengthMismatch {
                src: s.len(),
                dst: dst.len(),
            });
        }
        if !dst.len().is_multiple_of(sector_bytes) {
            return Err(CryptoError::Unaligned {
                len: dst.len(),
                sector_bytes,
            });
        }
        let count = (dst.len() / sector_bytes) as u64;
        let iv_step = self.sector_size.iv_units();
        let out_of_range = CryptoError::SectorOutOfRange {
            first: first.0,
            count,
        };
        let first_iv_sector = first.0.checked_mul(iv_step).ok_or(out_of_range)?;
        if count > 0 {
            // The last sector's IV must fit in 64 bits too.
            (count - 1)
                .checked_mul(iv_step)
                .and_then(|span| first_iv_sector.checked_add(span))
                .ok_or(CryptoError::SectorOutOfRange {
                    first: first.0,
                    count,
                })?;
        }
        Ok(SectorRun {
            first_iv_sector,
            iv_step,
            sector_bytes,
            src,
            dst,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> VolumeKey {
        let mut k: Vec<u8> = (0..64u8).collect();
        VolumeKey::take_from(&mut k).unwrap()
    }

    #[test]
    fn engine_unaligned_buffer_is_refused() {
        let e = XtsEngine::new(&key(), SectorSize::S4096, BackendChoice::Auto).unwrap();
        let mut buf = vec![0u8; 4096 + 512];
        assert!(matches!(
            e.encrypt_sectors(SectorIndex(0), &mut buf),
            Err(CryptoError::Unaligned { .. })
        ));
    }

    #[test]
    fn engine_sector_past_iv_range_is_refused() {
        for kind in BackendKind::available() {
            let e = XtsEngine::new(&key(), SectorSize::S4096, BackendChoice::Force(kind)).unwrap();
            let mut buf = vec![0u8; 8192];
            // u64::MAX / 8 is the last 4 KiB sector whose IV fits; two sectors from it do not.
            let last = u64::MAX / 8;
            assert!(
                e.encrypt_sectors(SectorIndex(last), &mut buf[..4096])
                    .is_ok()
            );
            assert!(matches!(
                e.encrypt_sectors(SectorIndex(last), &mut buf),
                Err(CryptoError::SectorOutOfRange { .. })
            ));
            assert!(matches!(
                e.encrypt_sectors(SectorIndex(u64::MAX), &mut buf[..4096]),
                Err(CryptoError::SectorOutOfRange { .. })
            ));
        }
    }

    #[test]
    fn engine_summary_names_backend_and_sector_size() {
        let e = XtsEngine::new(
            &key(),
            SectorSize::S4096,
            BackendChoice::Force(BackendKind::Hw),
        )
        .unwrap();
        let line = e.summary();
        assert!(line.starts_with("aes-xts-plain64 backend=hw ("), "{line}");
        assert!(line.contains("sector_bytes=4096"), "{line}");
    }

    #[test]
    fn engine_empty_buffer_is_a_no_op() {
        let e = XtsEngine::new(&key(), SectorSize::S512, BackendChoice::Auto).unwrap();
        e.encrypt_sectors(SectorIndex(u64::MAX), &mut []).unwrap();
    }

    #[test]
    fn engine_length_mismatch_is_refused() {
        let e = XtsEngine::new(&key(), SectorSize::S512, BackendChoice::Auto).unwrap();
        let src = vec![0u8; 1024];
        let mut dst = vec![0u8; 512];
        assert!(matches!(
            e.encrypt_sectors_to(SectorIndex(0), &src, &mut dst),
            Err(CryptoError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn backend_choice_parses_names() {
        assert_eq!(
            "auto".parse::<BackendChoice>().unwrap(),
            BackendChoice::Auto
        );
        assert_eq!(
            "HW".parse::<BackendChoice>().unwrap(),
            BackendChoice::Force(BackendKind::Hw)
        );
        assert_eq!(
            "portable".parse::<BackendChoice>().unwrap(),
            BackendChoice::Force(BackendKind::Portable)
        );
        assert!("fast".parse::<BackendChoice>().is_err());
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<XtsEngine>();
    }

    /// IEEE 1619 has no XTS-AES-256 vector with K1 = K2, AWS-LC (`hw`) refuses such keys and
    /// `VolumeKey` refuses them too; the batched `portable` and `vaes` arithmetic must still be
    /// right for them, so they are built here directly and checked against `xts-mode`.
    #[test]
    fn equal_halves_on_batched_backends_match_xts_mode() {
        use aes::cipher::KeyInit;
        let half: [u8; 32] = std::array::from_fn(|i| u8::try_from(i * 7 + 3).unwrap());
        for size in SectorSize::ALL {
            let plain: Vec<u8> = (0..size.bytes() * 3)
                .map(|i| u8::try_from(i % 251).unwrap())
                .collect();
            let mut expected = plain.clone();
            let xts = xts_mode::Xts128::new(
                aes::Aes256::new(&half.into()),
                aes::Aes256::new(&half.into()),
            );
            let units = u128::from(size.iv_units());
            xts.encrypt_area(&mut expected, size.bytes(), 0, |i| {
                xts_mode::get_tweak_default((77 + i) * units)
            });
            let mut engines = vec![XtsEngine {
                sector_size: size,
                backend: Backend::Portable(portable::PortableXts::new(&half, &half).unwrap()),
            }];
            #[cfg(target_arch = "x86_64")]
            if vaes::supported() {
                engines.push(XtsEngine {
                    sector_size: size,
                    backend: Backend::Vaes(vaes::VaesXts::new(&half, &half).unwrap()),
                });
            }
            #[cfg(target_arch = "x86_64")]
            if vaes256::supported() {
                engines.push(XtsEngine {
                    sector_size: size,
                    backend: Backend::Vaes256(vaes256::Vaes256Xts::new(&half, &half).unwrap()),
                });
            }
            for e in engines {
                let mut buf = plain.clone();
                e.encrypt_sectors(SectorIndex(77), &mut buf).unwrap();
                assert_eq!(buf, expected, "{} {size}", e.backend_kind());
            }
        }
    }
}
