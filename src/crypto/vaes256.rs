//! The `vaes256` backend: nbdcrypt's XTS kernel on VAES and VPCLMULQDQ over 256-bit registers
//! (x86_64 with AVX2, no AVX-512 needed).
//!
//! Why a second width: VAES and VPCLMULQDQ exist without AVX-512 on AMD Zen 3 and on Intel's
//! client cores since Alder Lake, and there the `vaes` kernel (ZMM) cannot run, so `auto` fell
//! back to AWS-LC's AES-NI XTS, which keeps one sector's blocks in flight and stalls on the
//! AES latency (5.3 GB/s on 4 KiB sectors on a Zen 3 EPYC, half of what its AES units do). This
//! kernel is the same design on YMM registers, two blocks per register (`vaes` has the
//! rationale):
//!
//! * the initial tweaks `E_K2(IV)` of up to [`GROUP`] sectors are encrypted together, two per
//!   register, sixteen in flight;
//! * data moves 16 blocks (256 bytes, eight YMM registers) per iteration: eight independent
//!   AES chains cover the latency, and the eight data and eight tweak registers fit the
//!   sixteen YMM registers (the round keys are memory operands);
//! * a sector's first eight tweaks are its initial one times α^0..α^7, four registers made
//!   side by side with variable shifts (no serial chain, no store and reload); later ones
//!   advance by α^8 per 128-bit lane with a byte shift and one carry-less multiply.
//!
//! Everything here runs only after [`supported`] has confirmed AES-NI, AVX2, VAES and
//! VPCLMULQDQ at run time (a [`Detected`] token held by [`Vaes256Xts`]). The check is `std`'s,
//! not `cpufeatures`': that crate reports VAES and VPCLMULQDQ only with AVX-512's ZMM state,
//! so it would never find them on the CPUs this kernel is for. The round keys are
//! `vaes`'s, expanded by the same code into a [`LockedBox`] and wiped with it.
#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m256i, _mm_loadu_si128, _mm256_aesdec_epi128, _mm256_aesdeclast_epi128, _mm256_aesenc_epi128,
    _mm256_aesenclast_epi128, _mm256_broadcastsi128_si256, _mm256_bslli_epi128,
    _mm256_bsrli_epi128, _mm256_clmulepi64_epi128, _mm256_loadu_si256, _mm256_set_epi64x,
    _mm256_setzero_si256, _mm256_sllv_epi64, _mm256_srlv_epi64, _mm256_storeu_si256,
    _mm256_xor_si256,
};

use super::locked::{LockedBox, Protection};
use super::vaes::{GROUP, Job, ROUNDS, RoundKeys, expand_locked};
use super::{CryptoError, SectorRun};

/// Whether this CPU (and OS: YMM state) can run the kernel. `std` caches the CPUID answer.
pub fn supported() -> bool {
    std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
}

/// Proof that [`supported`] said yes: only [`Detected::get`] makes one.
struct Detected(());

impl Detected {
    fn get() -> Option<Self> {
        supported().then_some(Detected(()))
    }
}

/// Bytes per kernel iteration: 16 blocks in eight YMM registers.
const STRIDE: usize = 256;

/// XTS-AES-256 on VAES-256.
pub struct Vaes256Xts {
    keys: LockedBox<RoundKeys>,
    _token: Detected,
}

impl Vaes256Xts {
    /// Expands both key halves into locked memory; `Unavailable` on CPUs without the features.
    pub fn new(k1: &[u8; 32], k2: &[u8; 32]) -> Result<Self, CryptoError> {
        let Some(token) = Detected::get() else {
            return Err(CryptoError::Unavailable {
                backend: "vaes256",
                reason: "needs AES-NI, AVX2, VAES and VPCLMULQDQ",
            });
        };
        // SAFETY: the features, AES-NI among them, were just confirmed.
        let keys = unsafe { expand_locked(k1, k2) }?;
        Ok(Vaes256Xts {
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
        let job = Job::new(run, STRIDE);
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

/// Every lane times α^8: byte shift left within each 128-bit lane, and the top byte folded
/// back by a carry-less multiply with 0x87.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_alpha8(t: __m256i, poly: __m256i) -> __m256i {
    let top = _mm256_bsrli_epi128::<15>(t);
    let folded = _mm256_clmulepi64_epi128::<0x00>(top, poly);
    _mm256_xor_si256(_mm256_bslli_epi128::<1>(t), folded)
}

/// Each 128-bit lane times α^k, k < 8 given per 64-bit half in `by` (the same in both halves
/// of a lane) and 64 − k in `rest`: a variable shift left across the lane, and the k bits
/// pushed past x^127 folded back by a carry-less multiply with 0x87.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_alpha_by(t: __m256i, by: __m256i, rest: __m256i, poly: __m256i) -> __m256i {
    let shifted = _mm256_sllv_epi64(t, by);
    // The bits each half pushes out (none where k = 0: a count of 64 gives zero).
    let out = _mm256_srlv_epi64(t, rest);
    let carried = _mm256_bslli_epi128::<8>(out);
    let top = _mm256_bsrli_epi128::<8>(out);
    let folded = _mm256_clmulepi64_epi128::<0x00>(top, poly);
    _mm256_xor_si256(_mm256_xor_si256(shifted, carried), folded)
}

/// The XTS kernel.
///
/// # Safety
/// The CPU must have the features [`supported`] checks; `job` must describe valid, identical or
/// disjoint buffers of `sectors × iterations_per_sector × 256` bytes.
#[target_feature(enable = "aes,avx2,vaes,vpclmulqdq")]
unsafe fn xts<const ENCRYPT: bool>(keys: &RoundKeys, job: &Job) {
    let schedule = if ENCRYPT { &keys.enc } else { &keys.dec };
    // Explicit loops, not closures: a closure would not inherit this function's features.
    let mut k = [_mm256_setzero_si256(); ROUNDS];
    let mut kt = [_mm256_setzero_si256(); ROUNDS];
    for i in 0..ROUNDS {
        k[i] = _mm256_broadcastsi128_si256(schedule[i]);
        kt[i] = _mm256_broadcastsi128_si256(keys.tweak[i]);
    }
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    // Register i of a sector's first tweaks holds α^(2i) and α^(2i+1) times the initial one:
    // the shift counts of each 64-bit half, and 64 minus them.
    let mut powers = [_mm256_setzero_si256(); 4];
    let mut rests = [_mm256_setzero_si256(); 4];
    for ((by, rest), k) in powers.iter_mut().zip(&mut rests).zip([0i64, 2, 4, 6]) {
        *by = _mm256_set_epi64x(k + 1, k + 1, k, k);
        *rest = _mm256_set_epi64x(63 - k, 63 - k, 64 - k, 64 - k);
    }

    let mut iv = job.first_iv_sector;
    let mut offset = 0usize;
    let mut done = 0usize;
    while done < job.sectors {
        let n = (job.sectors - done).min(GROUP);
        // Initial tweaks: E_K2(plain64 IV) for n sectors, two per register.
        let mut ivs = [0u64; 2 * GROUP];
        for s in 0..n {
            ivs[2 * s] = iv;
            iv = iv.wrapping_add(job.iv_step);
        }
        // Only the registers that hold this group's IVs: a one-sector request pays one.
        let regs = n.div_ceil(2);
        let mut tw = [_mm256_setzero_si256(); GROUP / 2];
        for (i, t) in tw.iter_mut().enumerate().take(regs) {
            // SAFETY: ivs holds 2·GROUP u64 = GROUP/2 × 32 bytes.
            let x = unsafe { _mm256_loadu_si256(ivs.as_ptr().add(4 * i).cast()) };
            *t = _mm256_xor_si256(x, kt[0]);
        }
        for r in kt.iter().take(ROUNDS - 1).skip(1) {
            for t in tw.iter_mut().take(regs) {
                *t = _mm256_aesenc_epi128(*t, *r);
            }
        }
        let mut initial = [0u128; GROUP];
        for (i, t) in tw.iter().enumerate().take(regs) {
            let t = _mm256_aesenclast_epi128(*t, kt[ROUNDS - 1]);
            // SAFETY: initial has room for GROUP = 2 × (GROUP/2) tweaks of 16 bytes.
            unsafe { _mm256_storeu_si256(initial.as_mut_ptr().add(2 * i).cast(), t) };
        }

        for t0 in initial.iter().take(n) {
            // Tweaks of blocks 0..8 of the sector, as four registers (α^0..α^7 of the initial
            // tweak, two lanes each, computed side by side); then α^8 steps.
            // SAFETY: `t0` is 16 readable bytes.
            let t0 =
                _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128((&raw const *t0).cast()) });
            let mut next = [_mm256_setzero_si256(); 4];
            for (x, (by, rest)) in next.iter_mut().zip(powers.iter().zip(&rests)) {
                *x = mul_alpha_by(t0, *by, *rest, poly);
            }
            for _ in 0..job.iterations_per_sector {
                // Registers 0..4 hold blocks 0..8 of this iteration, 4..8 blocks 8..16.
                let mut t = [
                    next[0], next[1], next[2], next[3], next[0], next[1], next[2], next[3],
                ];
                for i in 4..8 {
                    t[i] = mul_alpha8(t[i - 4], poly);
                }
                for i in 0..4 {
                    next[i] = mul_alpha8(t[i + 4], poly);
                }
                // SAFETY: offset + 256 <= len by the job's contract.
                let (src, dst) = unsafe { (job.src.add(offset), job.dst.add(offset)) };
                let mut d = [_mm256_setzero_si256(); 8];
                for (i, x) in d.iter_mut().enumerate() {
                    // SAFETY: 8 × 32 bytes from src are in bounds.
                    let v = unsafe { _mm256_loadu_si256(src.add(32 * i).cast()) };
                    *x = _mm256_xor_si256(_mm256_xor_si256(v, t[i]), k[0]);
                }
                for r in k.iter().take(ROUNDS - 1).skip(1) {
                    for x in &mut d {
                        *x = if ENCRYPT {
                            _mm256_aesenc_epi128(*x, *r)
                        } else {
                            _mm256_aesdec_epi128(*x, *r)
                        };
                    }
                }
                for (i, x) in d.iter().enumerate() {
                    let y = if ENCRYPT {
                        _mm256_aesenclast_epi128(*x, k[ROUNDS - 1])
                    } else {
                        _mm256_aesdeclast_epi128(*x, k[ROUNDS - 1])
                    };
                    // SAFETY: 8 × 32 bytes to dst are in bounds; src (if the same) was read.
                    unsafe {
                        _mm256_storeu_si256(dst.add(32 * i).cast(), _mm256_xor_si256(y, t[i]))
                    };
                }
                offset += STRIDE;
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
#[target_feature(enable = "avx2")]
fn wipe(keys: &mut [__m256i; ROUNDS]) {
    for k in keys.iter_mut() {
        // SAFETY: `k` is a valid, aligned, exclusively borrowed __m256i.
        unsafe { std::ptr::write_volatile(k, _mm256_setzero_si256()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vaes256_supported_matches_std_feature_detection() {
        let std_says = std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("vpclmulqdq");
        assert_eq!(supported(), std_says);
    }
}
