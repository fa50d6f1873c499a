//! XTS-AES-256 over runs of consecutive sectors, on the dm-crypt `aes-xts-plain64` layout.
//!
//! This module owns every raw key byte in nbdcrypt and is pure and synchronous: it does no I/O,
//! knows nothing of NBD or files, and never logs, formats or returns key material.
//!
//! * **Key**: [`VolumeKey`], 512 bits = K1 (data) ‖ K2 (tweak); equal halves are refused.
//! * **Tweak**: `plain64` — the IV of a sector is its number in **512-byte units**, as a 64-bit
//!   little-endian integer zero-padded to 16 bytes. For larger sectors the IV therefore steps by
//!   `sector_size / 512` (dm-crypt's and LUKS2's default; see `docs/on-disk-format.md`).
//! * **Sector sizes**: 512, 1024, 2048, 4096 bytes ([`SectorSize`]).
//! * **Backends** ([`BackendKind`]): `hw` (AWS-LC's assembly), `portable` (our XTS over the
//!   `aes` crate), `vaes` (our VAES-512 kernel, x86_64 with AVX-512) and `vaes256` (the same
//!   kernel on 256-bit registers, x86_64 with VAES and AVX2). All produce identical output;
//!   which one runs is chosen once, when the [`XtsEngine`] is built ([`BackendChoice`], or
//!   `NBDCRYPT_XTS_BACKEND`).
//!
//! Layout: [`gf`] tweak arithmetic, `portable`, `hw`, `vaes` and `vaes256` the backends, `key`
//! the key type, `locked` protected memory, [`cpu`] feature report. `unsafe` is confined to
//! `locked`, `hw` (FFI), `vaes` and `vaes256` (intrinsics).

pub mod cpu;
mod engine;
pub mod gf;
mod hw;
mod key;
pub mod locked;
mod portable;
#[cfg(target_arch = "x86_64")]
mod vaes;
#[cfg(target_arch = "x86_64")]
mod vaes256;

use std::fmt;
use std::str::FromStr;

pub(crate) use engine::SectorRun;
pub use engine::XtsEngine;
pub use key::{VOLUME_KEY_BYTES, VolumeKey};
pub use locked::Protection;

/// Environment variable that forces a backend: `auto`, `hw`, `portable`, `vaes` or `vaes256`.
pub const BACKEND_ENV: &str = "NBDCRYPT_XTS_BACKEND";

/// What went wrong in the crypto layer. No variant ever carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key is not 512 bits.
    #[error("a volume key must be {want} bytes (XTS-AES-256 uses two 256-bit keys); got {got}")]
    KeyLength {
        /// Bytes supplied.
        got: usize,
        /// Bytes required.
        want: usize,
    },
    /// K1 equals K2.
    #[error("the two halves of the XTS key are equal; XTS requires two independent keys")]
    EqualKeyHalves,
    /// The OS random source failed.
    #[error("the operating system's random source failed: {0}")]
    Randomness(String),
    /// Protected memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] locked::LockedAllocError),
    /// The sector size is not one of 512, 1024, 2048, 4096.
    #[error("unsupported sector size {0}: use 512, 1024, 2048 or 4096")]
    SectorSize(u64),
    /// A buffer is not a whole number of sectors.
    #[error("buffer of {len} bytes is not a whole number of {sector_bytes}-byte sectors")]
    Unaligned {
        /// Buffer length.
        len: usize,
        /// Sector size.
        sector_bytes: usize,
    },
    /// Source and destination differ in length.
    #[error("source is {src} bytes but destination is {dst} bytes")]
    LengthMismatch {
        /// Source length.
        src: usize,
        /// Destination length.
        dst: usize,
    },
    /// The sector numbers of the run do not fit the 64-bit plain64 IV.
    #[error("sectors {first}..+{count} are past the 64-bit plain64 IV range")]
    SectorOutOfRange {
        /// First sector of the run.
        first: u64,
        /// Sectors in the run.
        count: u64,
    },
    /// A backend was asked for by name but cannot run here.
    #[error("XTS backend `{backend}` is unavailable: {reason}")]
    Unavailable {
        /// The backend.
        backend: &'static str,
        /// What it needs that this machine or build lacks.
        reason: &'static str,
    },
    /// The backend library reported a failure.
    #[error("XTS backend `{backend}` failed in {operation}: {cause}")]
    Backend {
        /// The backend.
        backend: &'static str,
        /// The library call that failed.
        operation: &'static str,
        /// The library's error.
        #[source]
        cause: crate::error::Cause,
    },
    /// An unknown backend name.
    #[error("unknown XTS backend `{0}`: use auto, hw, portable, vaes or vaes256")]
    UnknownBackend(String),
}

/// The size of one encrypted sector (one XTS data unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SectorSize {
    /// 512 bytes.
    S512,
    /// 1024 bytes.
    S1024,
    /// 2048 bytes.
    S2048,
    /// 4096 bytes.
    S4096,
}

impl SectorSize {
    /// Every supported size, smallest first.
    pub const ALL: [SectorSize; 4] = [Self::S512, Self::S1024, Self::S2048, Self::S4096];

    /// The size in bytes.
    pub const fn bytes(self) -> usize {
        match self {
            Self::S512 => 512,
            Self::S1024 => 1024,
            Self::S2048 => 2048,
            Self::S4096 => 4096,
        }
    }

    /// How many 512-byte IV units one sector spans (the plain64 IV step).
    pub const fn iv_units(self) -> u64 {
        (self.bytes() / 512) as u64
    }

    /// Parses a size given in bytes.
    pub fn from_bytes(bytes: u64) -> Result<Self, CryptoError> {
        match bytes {
            512 => Ok(Self::S512),
            1024 => Ok(Self::S1024),
            2048 => Ok(Self::S2048),
            4096 => Ok(Self::S4096),
            other => Err(CryptoError::SectorSize(other)),
        }
    }
}

impl fmt::Display for SectorSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes())
    }
}

/// A sector number, counted in units of the volume's own [`SectorSize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SectorIndex(pub u64);

/// The implementations of XTS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// AWS-LC's `EVP_aes_256_xts` assembly, one call per sector.
    Hw,
    /// nbdcrypt's XTS over the `aes` crate, batched across sectors.
    Portable,
    /// nbdcrypt's own VAES-512/VPCLMULQDQ kernel, batched across sectors (x86_64 with
    /// AVX-512; unavailable elsewhere).
    Vaes,
    /// The same kernel on VAES-256/VPCLMULQDQ, batched across sectors (x86_64 with VAES and
    /// AVX2: AMD Zen 3, Intel Alder Lake and later; unavailable elsewhere).
    Vaes256,
}

impl BackendKind {
    /// Every backend, available here or not.
    pub const ALL: [BackendKind; 4] = [Self::Hw, Self::Portable, Self::Vaes, Self::Vaes256];

    /// The backends this CPU can run.
    pub fn available() -> Vec<BackendKind> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// Whether this CPU can run the backend.
    pub fn is_available(self) -> bool {
        match self {
            Self::Hw | Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Vaes => vaes::supported(),
            #[cfg(target_arch = "x86_64")]
            Self::Vaes256 => vaes256::supported(),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Vaes | Self::Vaes256 => false,
        }
    }

    /// The name used on the command line and in `NBDCRYPT_XTS_BACKEND`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hw => "hw",
            Self::Portable => "portable",
            Self::Vaes => "vaes",
            Self::Vaes256 => "vaes256",
        }
    }

    /// The AES code path this backend takes on this CPU.
    pub fn path(self) -> &'static str {
        match self {
            Self::Hw => cpu::hw_path(),
            Self::Portable => cpu::portable_path(),
            Self::Vaes if self.is_available() => {
                "nbdcrypt VAES-512+VPCLMULQDQ kernel (32-block batches)"
            }
            Self::Vaes => "unavailable: needs x86_64 with AES-NI, AVX-512F/BW, VAES, VPCLMULQDQ",
            Self::Vaes256 if self.is_available() => {
                "nbdcrypt VAES-256+VPCLMULQDQ kernel (16-block batches)"
            }
            Self::Vaes256 => "unavailable: needs x86_64 with AES-NI, AVX2, VAES, VPCLMULQDQ",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the backend is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// The fastest backend for this CPU and sector size ([`BackendChoice::resolve`]).
    #[default]
    Auto,
    /// Exactly this backend, or an error.
    Force(BackendKind),
}

impl FromStr for BackendChoice {
    type Err = CryptoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "hw" => Ok(Self::Force(BackendKind::Hw)),
            "portable" => Ok(Self::Force(BackendKind::Portable)),
            "vaes" => Ok(Self::Force(BackendKind::Vaes)),
            "vaes256" => Ok(Self::Force(BackendKind::Vaes256)),
            other => Err(CryptoError::UnknownBackend(other.to_owned())),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Force(k) => write!(f, "{k}"),
        }
    }
}

impl BackendChoice {
    /// The choice in `NBDCRYPT_XTS_BACKEND`, or `Auto` when it is unset.
    pub fn from_env() -> Result<Self, CryptoError> {
        match std::env::var(BACKEND_ENV) {
            Ok(v) => v.parse(),
            Err(_) => Ok(Self::Auto),
        }
    }

    /// The backend this choice selects for `sector_size` on this CPU.
    ///
    /// `Auto` picks `vaes` where the CPU has it: batching across sectors, it is the fastest at
    /// every sector size measured, and the only one near the hardware limit at 512 bytes
    /// (`BENCHMARKING.md`). Elsewhere it picks `hw`: AWS-LC's AES-NI or ARMv8 assembly beats
    /// the `aes` crate, and without AES instructions AWS-LC's constant-time fallback is still
    /// the better software path. `portable` is for cross-checking and for forcing.
    pub fn resolve(self, _sector_size: SectorSize) -> BackendKind {
        match self {
            Self::Auto if BackendKind::Vaes.is_available() => BackendKind::Vaes,
            Self::Auto if BackendKind::Vaes256.is_available() => BackendKind::Vaes256,
            Self::Auto => BackendKind::Hw,
            Self::Force(k) => k,
        }
    }
}

/// Wipes 8 KiB of stack below the caller, where key-schedule temporaries or round-key copies
/// may have been left by code the caller called (a constructor returning by value, the `aes`
/// crate's backends). Word-sized volatile stores: cheap enough to run after every request.
#[inline(never)]
pub(crate) fn scrub_stack() {
    use zeroize::Zeroize;
    let mut area = [0u64; 1024];
    area.zeroize();
    std::hint::black_box(&area);
}
