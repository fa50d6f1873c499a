//! The `vaes` backend: nbdcrypt's own XTS kernel on VAES-512 and VPCLMULQDQ (x86_64).
//!
//! Why a kernel of our own: AWS-LC's XTS (`hw`) processes one data unit per call, and each call
//! pays a fixed cost (the serial encryption of the sector's tweak, pipeline fill and drain, the
//! EVP layer) that halves its throughput on 512-byte sectors. XTS blocks are independent once
//! their tweaks are known, so this kernel batches across sectors instead:
//!
//! * the initial tweaks `E_K2(IV)` of up to [`GROUP`] sectors are encrypted together, four per
//!   ZMM register, sixteen in flight;
//! * data moves 32 blocks (512 bytes, eight ZMM registers) per iteration, which covers a whole
//!   512-byte sector or one eighth of a 4096-byte one, keeping every AES unit busy;
//! * tweaks advance by α^8 per 128-bit lane with a byte shift and one carry-less multiply
//!   (`t·x^8 = (t ≪ 8) ⊕ clmul(t ≫ 120, 0x87)`): no branch, no table.
//!
//! Everything in this file runs only after [`supported`] has confirmed AVX-512F/BW, VAES,
//! VPCLMULQDQ and AES-NI at run time (a `cpufeatures` token held by [`VaesXts`]). Round keys
//! live in a [`LockedBox`] and are wiped with it.
#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m128i, __m512i, _mm_aesimc_si128, _mm_aeskeygenassist_si128, _mm_loadu_si128,
    _mm_shuffle_epi32, _mm_slli_si128, _mm_xor_si128, _mm512_aesdec_epi128,
    _mm512_aesdeclast_epi128, _mm512_aesenc_epi128, _mm512_aesenclast_epi128,
    _mm512_broadcast_i32x4, _mm512_bslli_epi128, _mm512_bsrli_epi128, _mm512_clmulepi64_epi128,
    _mm512_loadu_si512, _mm512_set_epi64, _mm512_setzero_si512, _mm512_storeu_si512,
    _mm512_xor_si512,
};

use super::gf;
use super::locked::{LockedBox, Protection};
use super::{CryptoError, SectorRun};

cpufeatures::new!(vaes_xts, "aes", "avx512f", "avx512bw", "vaes", "vpclmulqdq");

/// Whether this CPU can run the kernel.
pub fn supported() -> bool {
    vaes_xts::get()
}

/// Sectors whose initial tweaks are encrypted in one pass (four ZMM registers of four).
pub(super) const GROUP: usize = 16;
/// AES-256 round keys.
pub(super) const ROUNDS: usize = 15;

/// Expanded keys: K1 for encryption and (equivalent-inverse-cipher) decryption, K2 for tweaks.
pub(super) struct RoundKeys {
    pub(super) enc: [__m128i; ROUNDS],
    pub(super) dec: [__m128i; ROUNDS],
    pub(super) tweak: [__m128i; ROUNDS],
}

/// XTS-AES-256 on VAES-512.
pub struct VaesXts {
    keys: LockedBox<RoundKeys>,
    _token: vaes_xts::InitToken,
}

impl VaesXts {
    /// Expands both key halves into locked memory; `Unavailable` on CPUs without the features.
    pub fn new(k1: &[u8; 32], k2: &[u8; 32]) -> Result<Self, CryptoError> {
        let (token, present) = vaes_xts::init_get();
        if !present {
            return Err(CryptoError::Unavailable {
                backend: "vaes",
                reason: "needs AES-NI, AVX-512F, AVX-512BW, VAES and VPCLMULQDQ",
            });
        }
        // SAFETY: the features, AES-NI among them, were just confirmed.
        let keys = unsafe { expand_locked(k1, k2) }?;
        Ok(VaesXts {
            keys,
            _token: token,
        })
    }

    /// What the OS granted for the pages holding the round keys.
    pub fn protection(&self) -> Protection {
        self.keys.protection()
    }

    /// Encrypts (or decrypts) `run`, whose buffers the caller has validated.
    pub fn process(&self, run: SectorRun<'_, '_>, encrypt: bool) {
        let job = Job::new(run, 512);
        // SAFETY: `new` only succeeds when the CPU has every feature the kernel is compiled
        // for; `job` describes the run's valid bytes at src and dst, which are identical or
        // disjoint (validated by `XtsEngine`), a whole number of sectors of 512·k bytes.
        unsafe {
            if encrypt {
                xts::<true>(&self.keys, &job);
            } else {
                xts::<false>(&self.keys, &job);
            }
        }
    }
}

/// One validated run, as raw pointers for a kernel.
pub(super) struct Job {
    pub(super) src: *const u8,
    pub(super) dst: *mut u8,
    pub(super) sectors: usize,
    /// The kernel's iterations per sector (its stride: 512 bytes here, 256 in `vaes256`).
    pub(super) iterations_per_sector: usize,
    pub(super) first_iv_sector: u64,
    pub(super) iv_step: u64,
}

impl Job {
    /// `run` as raw pointers, for a kernel that moves `stride` bytes per iteration (a divisor
    /// of 512).
    pub(super) fn new(run: SectorRun<'_, '_>, stride: usize) -> Self {
        let SectorRun {
            first_iv_sector,
            iv_step,
            sector_bytes,
            src,
            dst,
        } = run;
        let dst_ptr = dst.as_mut_ptr();
        Job {
            src: src.map_or(dst_ptr.cast_const(), <[u8]>::as_ptr),
            dst: dst_ptr,
            sectors: dst.len() / sector_bytes,
            iterations_per_sector: sector_bytes / stride,
            first_iv_sector,
            iv_step,
        }
    }
}

/// Both key halves expanded straight into locked pages (no stack copy of the schedules
/// outlives the call; the stack below is scrubbed after it).
///
/// # Safety
/// The CPU must have AES-NI.
pub(super) unsafe fn expand_locked(
    k1: &[u8; 32],
    k2: &[u8; 32],
) -> Result<LockedBox<RoundKeys>, CryptoError> {
    let keys = LockedBox::new_with(|slot| {
        // SAFETY: AES-NI is present (the caller's contract); `expand` writes all three arrays
        // of the slot in place.
        unsafe { expand(k1, k2, slot.as_mut_ptr()) };
    })?;
    super::scrub_stack();
    Ok(keys)
}

/// AES-256 key expansion (FIPS-197 §5.2) with AESKEYGENASSIST, written straight into `out`.
///
/// # Safety
/// The CPU must have AES-NI; `out` must be valid for writes of one `RoundKeys`.
#[target_feature(enable = "aes,sse2")]
unsafe fn expand(k1: &[u8; 32], k2: &[u8; 32], out: *mut RoundKeys) {
    // SAFETY: out is valid for writes (caller); each field is written through raw pointers
    // before anything reads it.
    unsafe {
        expand_one(k1, &raw mut (*out).enc);
        expand_one(k2, &raw mut (*out).tweak);
        let enc = &(*out).enc;
        let dec = &raw mut (*out).dec;
        (*dec)[0] = enc[ROUNDS - 1];
        for i in 1..ROUNDS - 1 {
            (*dec)[i] = _mm_aesimc_si128(enc[ROUNDS - 1 - i]);
        }
        (*dec)[ROUNDS - 1] = enc[0];
    }
}

#[target_feature(enable = "aes,sse2")]
fn expand_one(key: &[u8; 32], rk: *mut [__m128i; ROUNDS]) {
    #[inline(always)]
    fn mix(mut a: __m128i, assist: __m128i) -> __m128i {
        // SAFETY: SSE2 is part of x86_64.
        unsafe {
            let mut s = _mm_slli_si128::<4>(a);
            a = _mm_xor_si128(a, s);
            s = _mm_slli_si128::<4>(s);
            a = _mm_xor_si128(a, s);
            s = _mm_slli_si128::<4>(s);
            a = _mm_xor_si128(a, s);
            _mm_xor_si128(a, assist)
        }
    }
    macro_rules! round_pair {
        ($rk:ident, $a:ident, $b:ident, $i:expr, $rcon:expr) => {
            $a = mix(
                $a,
                _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>($b)),
            );
            $rk[2 * $i] = $a;
            if 2 * $i + 1 < ROUNDS {
                $b = mix(
                    $b,
                    _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>($a)),
                );
                $rk[2 * $i + 1] = $b;
            }
        };
    }
    // SAFETY: key is 32 readable bytes (two unaligned 16-byte loads); rk is valid for writes
    // (caller); AES-NI is enabled on this function and confirmed by the caller.
    unsafe {
        let rk = &mut *rk;
        let mut a = _mm_loadu_si128(key.as_ptr().cast());
        let mut b = _mm_loadu_si128(key.as_ptr().add(16).cast());
        rk[0] = a;
        rk[1] = b;
        round_pair!(rk, a, b, 1, 0x01);
        round_pair!(rk, a, b, 2, 0x02);
        round_pair!(rk, a, b, 3, 0x04);
        round_pair!(rk, a, b, 4, 0x08);
        round_pair!(rk, a, b, 5, 0x10);
        round_pair!(rk, a, b, 6, 0x20);
        round_pair!(rk, a, b, 7, 0x40);
    }
}

/// Every lane times α^8: byte shift left within each 128-bit lane, and the top byte folded
/// back by a carry-less multiply with 0x87.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_alpha8(t: __m512i, poly: __m512i) -> __m512i {
    let top = _mm512_bsrli_epi128::<15>(t);
    let folded = _mm512_clmulepi64_epi128::<0x00>(top, poly);
    _mm512_xor_si512(_mm512_bslli_epi128::<1>(t), folded)
}

/// The XTS kernel.
///
/// # Safety
/// The CPU must have the features of [`vaes_xts`]; `job` must describe valid, identical or
/// disjoint buffers of `sectors × iterations_per_sector × 512` bytes.
#[target_feature(enable = "aes,avx512f,avx512bw,vaes,vpclmulqdq")]
unsafe fn xts<const ENCRYPT: bool>(keys: &RoundKeys, job: &Job) {
    let schedule = if ENCRYPT { &keys.enc } else { &keys.dec };
    // Explicit loops, not closures: a closure would not inherit this function's features.
    let mut k = [_mm512_setzero_si512(); ROUNDS];
    let mut kt = [_mm512_setzero_si512(); ROUNDS];
    for i in 0..ROUNDS {
        k[i] = _mm512_broadcast_i32x4(schedule[i]);
        kt[i] = _mm512_broadcast_i32x4(keys.tweak[i]);
    }
    let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);

    let mut iv = job.first_iv_sector;
    let mut offset = 0usize;
    let mut done = 0usize;
    while done < job.sectors {
        let n = (job.sectors - done).min(GROUP);
        // Initial tweaks: E_K2(plain64 IV) for n sectors, four per register.
        let mut ivs = [0u64; 2 * GROUP];
        for s in 0..n {
            ivs[2 * s] = iv;
            iv = iv.wrapping_add(job.iv_step);
        }
        // Only the registers that hold this group's IVs: a one-sector request pays one.
        let regs = n.div_ceil(4);
        let mut tw = [_mm512_setzero_si512(); GROUP / 4];
        for (i, t) in tw.iter_mut().enumerate().take(regs) {
            // SAFETY: ivs holds 2·GROUP u64 = GROUP/4 × 64 bytes.
            let x = unsafe { _mm512_loadu_si512(ivs.as_ptr().add(8 * i).cast()) };
            *t = _mm512_xor_si512(x, kt[0]);
        }
        for r in kt.iter().take(ROUNDS - 1).skip(1) {
            for t in tw.iter_mut().take(regs) {
                *t = _mm512_aesenc_epi128(*t, *r);
            }
        }
        let mut initial = [0u128; GROUP];
        for (i, t) in tw.iter().enumerate().take(regs) {
            let t = _mm512_aesenclast_epi128(*t, kt[ROUNDS - 1]);
            // SAFETY: initial has room for GROUP = 4 × (GROUP/4) tweaks of 16 bytes.
            unsafe { _mm512_storeu_si512(initial.as_mut_ptr().add(4 * i).cast(), t) };
        }

        for &t0 in initial.iter().take(n) {
            // Tweaks of blocks 0..8 of the sector, as two registers; then α^8 steps.
            let mut first = [0u128; 8];
            let mut t = t0;
            for f in &mut first {
                *f = t;
                t = gf::mul_alpha(t);
            }
            // SAFETY: `first` is 128 readable bytes.
            let (mut a, mut b) = unsafe {
                (
                    _mm512_loadu_si512(first.as_ptr().cast()),
                    _mm512_loadu_si512(first.as_ptr().add(4).cast()),
                )
            };
            for _ in 0..job.iterations_per_sector {
                let mut t = [a, b, a, b, a, b, a, b];
                for i in 2..8 {
                    t[i] = mul_alpha8(t[i - 2], poly);
                }
                a = mul_alpha8(t[6], poly);
                b = mul_alpha8(t[7], poly);
                // SAFETY: offset + 512 <= len by the job's contract.
                let (src, dst) = unsafe { (job.src.add(offset), job.dst.add(offset)) };
                let mut d = [_mm512_setzero_si512(); 8];
                for (i, x) in d.iter_mut().enumerate() {
                    // SAFETY: 8 × 64 bytes from src are in bounds.
                    let v = unsafe { _mm512_loadu_si512(src.add(64 * i).cast()) };
                    *x = _mm512_xor_si512(_mm512_xor_si512(v, t[i]), k[0]);
                }
                for r in k.iter().take(ROUNDS - 1).skip(1) {
                    for x in &mut d {
                        *x = if ENCRYPT {
                            _mm512_aesenc_epi128(*x, *r)
                        } else {
                            _mm512_aesdec_epi128(*x, *r)
                        };
                    }
                }
                for (i, x) in d.iter().enumerate() {
                    let y = if ENCRYPT {
                        _mm512_aesenclast_epi128(*x, k[ROUNDS - 1])
                    } else {
                        _mm512_aesdeclast_epi128(*x, k[ROUNDS - 1])
                    };
                    // SAFETY: 8 × 64 bytes to dst are in bounds; src (if the same) was read.
                    unsafe {
                        _mm512_storeu_si512(dst.add(64 * i).cast(), _mm512_xor_si512(y, t[i]))
                    };
                }
                offset += 512;
            }
        }
        done += n;
    }
    // The broadcast round keys may have been spilled to this frame: wipe them before returning.
    wipe(&mut k);
    wipe(&mut kt);
}

/// Overwrites round-key registers spilled to the stack, with volatile full-width stores (not
/// optimised away; 15 stores per array).
#[inline]
#[target_feature(enable = "avx512f")]
fn wipe(keys: &mut [__m512i; ROUNDS]) {
    for k in keys.iter_mut() {
        // SAFETY: `k` is a valid, aligned, exclusively borrowed __m512i.
        unsafe { std::ptr::write_volatile(k, _mm512_setzero_si512()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vaes_supported_matches_std_feature_detection() {
        let std_says = std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("vpclmulqdq");
        assert_eq!(supported(), std_says);
    }

    #[test]
    fn vaes_key_expansion_matches_fips197_appendix_a3() {
        // FIPS-197 Appendix A.3: AES-256 key expansion of 603deb10…0914dff4; w[56..60] is the
        // last round key.
        if !supported() {
            return;
        }
        let key: [u8; 32] = [
            0x60, 0x3d, 0xeb, 0x10, 0x15, 0xca, 0x71, 0xbe, 0x2b, 0x73, 0xae, 0xf0, 0x85, 0x7d,
            0x77, 0x81, 0x1f, 0x35, 0x2c, 0x07, 0x3b, 0x61, 0x08, 0xd7, 0x2d, 0x98, 0x10, 0xa3,
            0x09, 0x14, 0xdf, 0xf4,
        ];
        let x = VaesXts::new(&key, &key).unwrap();
        let mut last = [0u8; 16];
        // SAFETY: __m128i is 16 plain bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&raw const x.keys.enc[14]).cast::<u8>(),
                last.as_mut_ptr(),
                16,
            )
        };
        assert_eq!(
            last,
            [
                0xfe, 0x48, 0x90, 0xd1, 0xe6, 0x18, 0x8d, 0x0b, 0x04, 0x6d, 0xf3, 0x44, 0x70, 0x6c,
                0x63, 0x1e
            ]
        );
    }
}
