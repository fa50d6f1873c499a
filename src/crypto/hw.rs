//! The `hw` backend: AWS-LC's `EVP_aes_256_xts` (through `aws-lc-sys`).
//!
//! AWS-LC runs XTS in hand-written assembly: AES-NI on x86_64, a VAES/VPCLMULQDQ/AVX-512 path
//! when the CPU has AVX-512F, VAES, VPCLMULQDQ and VBMI2, and the ARMv8 Crypto Extensions on
//! aarch64. One `EVP_CipherUpdate` call is one XTS data unit, so each sector is one call; the
//! per-call cost is a 16-byte IV copy plus the call itself.
//!
//! An `EVP_CIPHER_CTX` carries the IV of the call in flight, so a context serves one thread at a
//! time. Each direction keeps a pool of context slots; a call claims one with an atomic
//! compare-exchange, runs its whole request, and releases it. New contexts are copies of a template (`EVP_CIPHER_CTX_copy`), so the raw
//! key is needed only at construction.
//!
//! Key schedules live in AWS-LC's heap (`cipher_data`). Their pages are locked and excluded
//! from dumps with a [`PageLock`] while the context lives; AWS-LC wipes `cipher_data` when the
//! context is freed (`EVP_CIPHER_CTX_cleanup` → `OPENSSL_free`, which cleanses before freeing).
//!
//! AWS-LC refuses keys whose two halves are equal (`CIPHER_R_XTS_DUPLICATED_KEYS`), as FIPS
//! requires; [`super::VolumeKey`] refuses them first anyway.
#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use aws_lc_sys as lc;

use super::locked::{PageLock, Protection};
use super::{CryptoError, SectorRun, gf};
use crate::error::Cause;

/// Size of AWS-LC's `EVP_AES_XTS_CTX` (two 248-byte aligned `AES_KEY`s, an `XTS128_CONTEXT` of
/// four pointers and an `int`), rounded up. It only decides which heap pages get locked.
const XTS_CIPHER_DATA_BYTES: usize = 576;

/// One AWS-LC cipher context with its key set.
struct Ctx {
    ptr: NonNull<lc::EVP_CIPHER_CTX>,
    pages: PageLock,
}

// SAFETY: an EVP_CIPHER_CTX has no thread affinity, so moving one to another thread is sound.
// It is used by one thread at a time: a slot's context only by the thread whose atomic claim
// set the slot's `busy` flag (see `Pool`), the template only under its `Mutex`, and a
// temporary copy only by the thread that made it.
unsafe impl Send for Ctx {}

impl Ctx {
    /// Wraps a context that AWS-LC has just initialised with a key.
    ///
    /// # Safety
    /// `ptr` must be a valid, key-initialised XTS context that nobody else owns.
    unsafe fn adopt(ptr: NonNull<lc::EVP_CIPHER_CTX>) -> Ctx {
        // SAFETY: per the contract, ptr is valid; cipher_data was allocated by the XTS init.
        let data = unsafe { (*ptr.as_ptr()).cipher_data };
        Ctx {
            ptr,
            pages: PageLock::new(data.cast::<u8>(), XTS_CIPHER_DATA_BYTES),
        }
    }

    fn with_key(key: &[u8; 64], encrypt: bool) -> Result<Ctx, CryptoError> {
        // SAFETY: EVP_CIPHER_CTX_new has no preconditions; a null result is handled.
        let raw = unsafe { lc::EVP_CIPHER_CTX_new() };
        let ptr = NonNull::new(raw).ok_or(CryptoError::Backend {
            backend: "hw",
            operation: "EVP_CIPHER_CTX_new",
            cause: Cause::msg("out of memory"),
        })?;
        // SAFETY: ptr is a fresh context; key points to 64 readable bytes, which is the key
        // length of EVP_aes_256_xts; a null IV is allowed at key-setting time.
        let ok = unsafe {
            lc::EVP_CipherInit_ex(
                ptr.as_ptr(),
                lc::EVP_aes_256_xts(),
                std::ptr::null_mut(),
                key.as_ptr(),
                std::ptr::null(),
                i32::from(encrypt),
            )
        };
        if ok != 1 {
            let cause = last_error();
            // SAFETY: ptr came from EVP_CIPHER_CTX_new and is not used after this.
            unsafe { lc::EVP_CIPHER_CTX_free(ptr.as_ptr()) };
            return Err(CryptoError::Backend {
                backend: "hw",
                operation: "EVP_CipherInit_ex",
                cause,
            });
        }
        // SAFETY: ptr is valid and key-initialised, and owned only by us.
        Ok(unsafe { Ctx::adopt(ptr) })
    }

    fn try_clone(&self) -> Result<Ctx, CryptoError> {
        // SAFETY: no preconditions; null handled.
        let raw = unsafe { lc::EVP_CIPHER_CTX_new() };
        let ptr = NonNull::new(raw).ok_or(CryptoError::Backend {
            backend: "hw",
            operation: "EVP_CIPHER_CTX_new",
            cause: Cause::msg("out of memory"),
        })?;
        // SAFETY: both contexts are valid; the template is only ever reached under its pool's
        // mutex, so nothing else uses it during the copy.
        let ok = unsafe { lc::EVP_CIPHER_CTX_copy(ptr.as_ptr(), self.ptr.as_ptr()) };
        if ok != 1 {
            let cause = last_error();
            // SAFETY: ptr is ours and unused after this.
            unsafe { lc::EVP_CIPHER_CTX_free(ptr.as_ptr()) };
            return Err(CryptoError::Backend {
                backend: "hw",
                operation: "EVP_CIPHER_CTX_copy",
                cause,
            });
        }
        // SAFETY: the copy holds the template's key schedules (EVP_CTRL_COPY re-points them).
        Ok(unsafe { Ctx::adopt(ptr) })
    }

    /// Runs one sector (one XTS data unit) from `src` to `dst` (which may be the same buffer).
    ///
    /// # Safety
    /// `src` and `dst` must each be valid for `len` bytes, and be either identical or disjoint.
    #[inline]
    unsafe fn sector(&mut self, iv: &[u8; 16], src: *const u8, dst: *mut u8, len: usize) -> bool {
        let ctx = self.ptr.as_ptr();
        let Ok(in_len) = i32::try_from(len) else {
            return false;
        };
        let mut out_len: i32 = 0;
        // SAFETY: ctx is valid with its key and direction set; passing only an IV (null cipher,
        // key and engine, enc = -1) starts a new data unit without touching the key.
        let ok_iv = unsafe {
            lc::EVP_CipherInit_ex(
                ctx,
                std::ptr::null(),
                std::ptr::null_mut(),
                std::ptr::null(),
                iv.as_ptr(),
                -1,
            )
        };
        // SAFETY: caller guarantees src/dst are valid for len bytes and identical or disjoint,
        // which AWS-LC accepts; XTS has a block size of 1 in EVP, so no bytes are buffered.
        let ok_data = unsafe { lc::EVP_CipherUpdate(ctx, dst, &mut out_len, src, in_len) };
        ok_iv == 1 && ok_data == 1 && out_len == in_len
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: the context is ours and is freed once. EVP_CIPHER_CTX_free cleanses the key
        // schedules (OPENSSL_free wipes every allocation) before the PageLock field is dropped.
        unsafe { lc::EVP_CIPHER_CTX_free(self.ptr.as_ptr()) };
    }
}

/// An error from AWS-LC's error queue: its packed code and its text (never key material:
/// AWS-LC's error strings are static reason codes).
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct LibraryError {
    /// AWS-LC's packed error code (library, reason); 0 when the queue was empty.
    pub code: u64,
    /// `ERR_error_string_n`'s text.
    pub text: String,
}

/// The oldest error on this thread's AWS-LC error queue.
fn last_error() -> Cause {
    // SAFETY: ERR_get_error reads this thread's error queue; no pointers.
    let code = unsafe { lc::ERR_get_error() };
    if code == 0 {
        return Cause::new(LibraryError {
            code: 0,
            text: "unknown AWS-LC failure (empty error queue)".into(),
        });
    }
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; AWS-LC NUL-terminates within it.
    unsafe { lc::ERR_error_string_n(code, buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Cause::new(LibraryError {
        code: u64::from(code),
        text: String::from_utf8_lossy(&buf[..end]).into_owned(),
    })
}

/// One reusable context, claimed by a single atomic compare-exchange.
struct Slot {
    busy: AtomicBool,
    ctx: UnsafeCell<Option<Ctx>>,
}

/// Clears a slot's `busy` flag when the claim ends, also on unwind.
struct Claim<'a>(&'a AtomicBool);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Contexts of one direction: a keyed template and lazily made copies of it in slots.
///
/// A request claims a free slot with one compare-exchange (no lock on the hot path) and keeps
/// it for its whole run. Threads start their search at different slots. When every slot is busy
/// the request uses a temporary copy, freed (and wiped by AWS-LC) afterwards.
struct Pool {
    template: Mutex<Ctx>,
    slots: Box<[Slot]>,
}

// SAFETY: a slot's context is only reached by the thread that switched its `busy` flag from
// false to true (Acquire), and is handed back with a Release store, so no two threads ever
// touch one context at once; the template is behind a Mutex. Ctx itself is Send.
unsafe impl Sync for Pool {}

fn slot_hint() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static HINT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    HINT.with(|h| *h)
}

impl Pool {
    fn new(template: Ctx) -> Pool {
        let slots = std::thread::available_parallelism()
            .map_or(4, |n| n.get() * 2)
            .clamp(4, 64);
        Pool {
            template: Mutex::new(template),
            slots: (0..slots)
                .map(|_| Slot {
                    busy: AtomicBool::new(false),
                    ctx: UnsafeCell::new(None),
                })
                .collect(),
        }
    }

    fn copy_template(&self) -> Result<Ctx, CryptoError> {
        self.template
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_clone()
    }

    fn with_ctx<R>(&self, f: impl FnOnce(&mut Ctx) -> R) -> Result<R, CryptoError> {
        let n = self.slots.len();
        let start = slot_hint() % n;
        for i in 0..n {
            let slot = &self.slots[(start + i) % n];
            if slot
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let _claim = Claim(&slot.busy);
            // SAFETY: this thread owns the slot until `_claim` drops (see `impl Sync for Pool`).
            let ctx = unsafe { &mut *slot.ctx.get() };
            if ctx.is_none() {
                *ctx = Some(self.copy_template()?);
            }
            if let Some(c) = ctx.as_mut() {
                return Ok(f(c));
            }
        }
        let mut temporary = self.copy_template()?;
        Ok(f(&mut temporary))
    }
}

/// XTS-AES-256 on AWS-LC.
pub struct HwXts {
    enc: Pool,
    dec: Pool,
    protection: Protection,
}

impl HwXts {
    /// Sets up encrypt and decrypt contexts for a 512-bit key.
    pub fn new(key: &[u8; 64]) -> Result<Self, CryptoError> {
        let enc = Ctx::with_key(key, true)?;
        let dec = Ctx::with_key(key, false)?;
        let (a, b) = (enc.pages.protection(), dec.pages.protection());
        Ok(HwXts {
            enc: Pool::new(enc),
            dec: Pool::new(dec),
            protection: Protection {
                locked: a.locked && b.locked,
                excluded_from_dumps: a.excluded_from_dumps && b.excluded_from_dumps,
            },
        })
    }

    /// What the OS granted for the pages holding the template schedules.
    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// Encrypts (or decrypts) `run`, whose buffers the caller has validated.
    pub fn process(&self, run: SectorRun<'_, '_>, encrypt: bool) -> Result<(), CryptoError> {
        let pool = if encrypt { &self.enc } else { &self.dec };
        pool.with_ctx(|ctx| Self::run(ctx, run))?
    }

    fn run(ctx: &mut Ctx, run: SectorRun<'_, '_>) -> Result<(), CryptoError> {
        let SectorRun {
            first_iv_sector,
            iv_step,
            sector_bytes,
            src,
            dst,
        } = run;
        let mut iv_sector = first_iv_sector;
        let sectors = dst.len() / sector_bytes;
        let dst_ptr = dst.as_mut_ptr();
        let src_ptr = src.map_or(dst_ptr.cast_const(), <[u8]>::as_ptr);
        for i in 0..sectors {
            let iv = gf::plain64_iv(iv_sector);
            let off = i * sector_bytes;
            // SAFETY: the caller validated that dst (and src, when present) are whole sectors of
            // `sector_bytes`, so off..off+sector_bytes is in bounds of both; src is either dst
            // itself or a distinct shared borrow, so they are identical or disjoint.
            let ok = unsafe { ctx.sector(&iv, src_ptr.add(off), dst_ptr.add(off), sector_bytes) };
            if !ok {
                return Err(CryptoError::Backend {
                    backend: "hw",
                    operation: "EVP_CipherUpdate",
                    cause: last_error(),
                });
            }
            iv_sector = iv_sector.wrapping_add(iv_step);
        }
        Ok(())
    }
}
