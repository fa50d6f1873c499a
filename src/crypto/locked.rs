//! Memory that holds secrets: locked against swap, left out of core dumps, wiped on release.
//!
//! This module owns every `mlock`/`madvise` call in nbdcrypt. It offers two things:
//!
//! * [`LockedBox<T>`]: a value placed in its own anonymous, page-aligned mapping. The pages are
//!   `mlock`ed and marked `MADV_DONTDUMP`. On drop the value is dropped in place, the *whole*
//!   mapping is zeroized with volatile writes, and only then unmapped.
//! * [`PageLock`]: the same protection for a region that somebody else allocated (AWS-LC's
//!   cipher context, whose key schedule lives on AWS-LC's heap). Heap pages may be shared by
//!   several such regions, so locks are reference-counted per page; a page is unlocked only when
//!   its last holder lets go.
//!
//! Where the OS refuses (`RLIMIT_MEMLOCK` too low, no `MADV_DONTDUMP`), the memory is still used
//! and still wiped; the refusal is reported through [`Protection`] so that callers can log it.
//! This module must never log key bytes, and it never looks at the contents it protects.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::mem::{align_of, size_of};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

use zeroize::Zeroize;

/// What the OS granted for one protected region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Protection {
    /// The pages are locked in RAM (`mlock` succeeded): they never reach swap.
    pub locked: bool,
    /// The pages are excluded from core dumps (`MADV_DONTDUMP` succeeded).
    pub excluded_from_dumps: bool,
}

impl Protection {
    /// Both protections are in force.
    pub fn is_full(self) -> bool {
        self.locked && self.excluded_from_dumps
    }

    fn both(self, other: Protection) -> Protection {
        Protection {
            locked: self.locked && other.locked,
            excluded_from_dumps: self.excluded_from_dumps && other.excluded_from_dumps,
        }
    }
}

/// The system page size, read once.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(v)
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// Allocation failed: the mapping itself could not be created.
#[derive(Debug, thiserror::Error)]
#[error("could not map {bytes} bytes of anonymous memory for secret material: {source}")]
pub struct LockedAllocError {
    bytes: usize,
    source: std::io::Error,
}

/// A `T` in its own locked, dump-excluded mapping, zeroized before the mapping is released.
///
/// `T` must not own heap memory of its own (that memory would not be protected): it is meant
/// for plain arrays and fixed-size key schedules.
pub struct LockedBox<T> {
    ptr: NonNull<T>,
    map_len: usize,
    protection: Protection,
    #[cfg(test)]
    retain_after_drop: bool,
}

// SAFETY: LockedBox owns its T exclusively (like Box<T>); sending or sharing it is as safe as
// sending or sharing the T itself.
unsafe impl<T: Send> Send for LockedBox<T> {}
// SAFETY: as above; `&LockedBox<T>` only hands out `&T`.
unsafe impl<T: Sync> Sync for LockedBox<T> {}

impl<T> LockedBox<T> {
    /// Maps fresh pages and builds the value *inside them* with `init`, so that the value never
    /// exists anywhere else (no stack temporary that would outlive this call).
    ///
    /// `init` receives a pointer to zeroed, properly aligned, writable memory for one `T` and
    /// must fully initialise it.
    pub fn new_with(
        init: impl FnOnce(&mut std::mem::MaybeUninit<T>),
    ) -> Result<Self, LockedAllocError> {
        let page = page_size();
        assert!(align_of::<T>() <= page, "over-aligned secret type");
        let map_len = size_of::<T>().max(1).div_ceil(page) * page;
        // SAFETY: anonymous private mapping with no address hint; the kernel picks a fresh range
        // that aliases nothing else. The result is checked against MAP_FAILED below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(LockedAllocError {
                bytes: map_len,
                source: std::io::Error::last_os_error(),
            });
        }
        let protection = protect_range(raw.cast(), map_len);
        // The mapping is page-aligned and at least size_of::<T>() long, and T's alignment is at
        // most a page, so the cast pointer is valid and aligned for one T.
        let Some(ptr) = NonNull::new(raw.cast::<T>()) else {
            unreachable!("mmap returned null without MAP_FAILED");
        };
        // SAFETY: ptr points to map_len >= size_of::<T>() zeroed bytes that we own exclusively;
        // MaybeUninit<T> has the layout of T, and any bytes are valid for MaybeUninit.
        let slot = unsafe { &mut *ptr.as_ptr().cast::<std::mem::MaybeUninit<T>>() };
        // If `init` panics, only wipe and unmap: there is no complete T to drop.
        struct WipeOnUnwind {
            raw: *mut u8,
            len: usize,
        }
        impl Drop for WipeOnUnwind {
            fn drop(&mut self) {
                // SAFETY: raw..raw+len is the mapping created above, still mapped, and the
                // half-built value in it is referenced by nobody once `init` has unwound.
                unsafe { wipe_and_unmap(self.raw, self.len) };
            }
        }
        let guard = WipeOnUnwind {
            raw: raw.cast(),
            len: map_len,
        };
        init(slot);
        std::mem::forget(guard);
        let this = LockedBox {
            ptr,
            map_len,
            protection,
            #[cfg(test)]
            retain_after_drop: false,
        };
        Ok(this)
    }

    /// What the OS granted for this value's pages.
    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// Test hook: keep the (already zeroized) pages mapped after drop so a test can read them.
    #[cfg(test)]
    pub(crate) fn retain_pages_after_drop(&mut self) -> (*const u8, usize) {
        self.retain_after_drop = true;
        (self.ptr.as_ptr().cast::<u8>().cast_const(), self.map_len)
    }
}

impl<T> std::ops::Deref for LockedBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: ptr was fully initialised by `new_with` and stays valid until drop.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> std::ops::DerefMut for LockedBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in Deref; &mut self guarantees exclusive access.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for LockedBox<T> {
    fn drop(&mut self) {
        // SAFETY: the T is initialised and is dropped exactly once, here. Its own Drop (e.g. the
        // aes crate's zeroizing Drop) runs first; then every byte of the mapping is wiped.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        let raw = self.ptr.as_ptr().cast::<u8>();
        #[cfg(test)]
        if self.retain_after_drop {
            // SAFETY: the mapping is still ours; wipe it and leave it mapped for inspection.
            unsafe { std::slice::from_raw_parts_mut(raw, self.map_len) }.zeroize();
            return;
        }
        // SAFETY: raw..raw+map_len is the mapping created in `new_with`, not yet unmapped, and no
        // reference into it survives this drop.
        unsafe { wipe_and_unmap(raw, self.map_len) };
    }
}

impl<T> std::fmt::Debug for LockedBox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedBox")
            .field("bytes", &self.map_len)
            .field("protection", &self.protection)
            .finish_non_exhaustive()
    }
}

/// Zeroizes a whole mapping with volatile writes, undoes the protections and unmaps it.
///
/// # Safety
/// `raw..raw+len` must be a live mapping created by `LockedBox::new_with`, referenced by nothing.
unsafe fn wipe_and_unmap(raw: *mut u8, len: usize) {
    // SAFETY: guaranteed by the caller: the range is mapped, writable and unaliased.
    unsafe { std::slice::from_raw_parts_mut(raw, len) }.zeroize();
    // SAFETY: munlock/munmap on a range we own; failures leave nothing unsound behind.
    unsafe {
        libc::munlock(raw.cast(), len);
        libc::munmap(raw.cast(), len);
    }
}

/// Locks and dump-excludes whole pages we own exclusively (a fresh mapping).
fn protect_range(start: *mut u8, len: usize) -> Protection {
    // SAFETY: mlock/madvise only change page attributes of a mapped range; they never touch the
    // contents. Callers pass page-aligned ranges inside their own mappings.
    let locked = unsafe { libc::mlock(start.cast(), len) } == 0;
    let lock_error = (!locked).then(std::io::Error::last_os_error);
    // SAFETY: as above.
    let excluded = unsafe { libc::madvise(start.cast(), len, libc::MADV_DONTDUMP) } == 0;
    let dump_error = (!excluded).then(std::io::Error::last_os_error);
    warn_degraded(lock_error, dump_error);
    Protection {
        locked,
        excluded_from_dumps: excluded,
    }
}

/// Logs a refused protection: a warning the first time, at debug level afterwards (a server
/// with many volumes must not flood its log with the same advice).
fn warn_degraded(lock_error: Option<std::io::Error>, dump_error: Option<std::io::Error>) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if lock_error.is_none() && dump_error.is_none() {
        return;
    }
    let first = !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(e) = lock_error {
        if first {
            tracing::warn!(
                error = %e,
                "could not lock key memory (mlock); key pages may reach swap. \
                 Raise RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=) or grant CAP_IPC_LOCK"
            );
        } else {
            tracing::debug!(error = %e, "mlock refused for key memory");
        }
    }
    if let Some(e) = dump_error {
        if first {
            tracing::warn!(error = %e, "could not exclude key memory from core dumps (MADV_DONTDUMP)");
        } else {
            tracing::debug!(error = %e, "MADV_DONTDUMP refused for key memory");
        }
    }
}

fn page_counts() -> &'static Mutex<HashMap<usize, usize>> {
    static COUNTS: OnceLock<Mutex<HashMap<usize, usize>>> = OnceLock::new();
    COUNTS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Protection for a region allocated by someone else (e.g. a C library's heap).
///
/// The pages that cover the region are locked and dump-excluded for as long as any `PageLock`
/// covers them. It does not wipe the region: its owner must (AWS-LC's `OPENSSL_free` does).
#[derive(Debug)]
pub struct PageLock {
    first_page: usize,
    pages: usize,
    protection: Protection,
}

impl PageLock {
    /// Protects the pages covering `start..start+len`.
    ///
    /// The region must stay allocated until this guard is dropped.
    pub fn new(start: *const u8, len: usize) -> PageLock {
        let page = page_size();
        let addr = start as usize;
        let first_page = addr & !(page - 1);
        let end = addr.saturating_add(len.max(1));
        let pages = (end - first_page).div_ceil(page);
        let mut protection = Protection {
            locked: true,
            excluded_from_dumps: true,
        };
        let mut counts = page_counts().lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..pages {
            let p = first_page + i * page;
            let count = counts.entry(p).or_insert(0);
            if *count == 0 {
                protection = protection.both(protect_range(p as *mut u8, page));
            }
            *count += 1;
        }
        PageLock {
            first_page,
            pages,
            protection,
        }
    }

    /// What the OS granted for these pages.
    pub fn protection(&self) -> Protection {
        self.protection
    }
}

impl Drop for PageLock {
    fn drop(&mut self) {
        let page = page_size();
        let mut counts = page_counts().lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..self.pages {
            let p = self.first_page + i * page;
            if let Some(count) = counts.get_mut(&p) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&p);
                    // SAFETY: the page is still mapped (the region's owner keeps it allocated
                    // until after this guard drops); undoing attributes never touches contents.
                    unsafe {
                        libc::munlock(p as *const libc::c_void, page);
                        libc::madvise(p as *mut libc::c_void, page, libc::MADV_DODUMP);
                    }
                }
            }
        }
    }
}

/// Makes the whole process undumpable where asked: no core file, no ptrace by unprivileged
/// peers. Used by the server as a second line behind per-page `MADV_DONTDUMP`.
pub fn disable_core_dumps() -> bool {
    nix::sys::prctl::set_dumpable(false).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locked_box_value_roundtrips_and_reports_protection() {
        let b = LockedBox::<[u8; 64]>::new_with(|slot| {
            slot.write([7u8; 64]);
        })
        .unwrap();
        assert_eq!(b[0], 7);
        assert_eq!(b[63], 7);
        // Root in this sandbox may lock; elsewhere it may not. Either way it must say which.
        let _ = b.protection().is_full();
    }

    #[test]
    fn locked_box_drop_wipes_every_byte_of_its_mapping() {
        let mut b = LockedBox::<[u8; 100]>::new_with(|slot| {
            slot.write([0xA5; 100]);
        })
        .unwrap();
        let (ptr, len) = b.retain_pages_after_drop();
        drop(b);
        // SAFETY: retain_pages_after_drop keeps the mapping alive (leaked) for this read.
        let after = unsafe { std::slice::from_raw_parts(ptr, len) };
        assert!(after.iter().all(|&x| x == 0));
    }

    #[test]
    fn page_lock_counts_shared_pages() {
        // A page of our own, so that no concurrently running test shares it.
        let v = LockedBox::<[u8; 64]>::new_with(|slot| {
            slot.write([1u8; 64]);
        })
        .unwrap();
        let a = PageLock::new(v.as_ptr(), 32);
        let b = PageLock::new(v[32..].as_ptr(), 32);
        let key = v.as_ptr() as usize & !(page_size() - 1);
        assert_eq!(page_counts().lock().unwrap().get(&key).copied(), Some(2));
        drop(a);
        assert_eq!(page_counts().lock().unwrap().get(&key).copied(), Some(1));
        drop(b);
        assert_eq!(page_counts().lock().unwrap().get(&key).copied(), None);
    }
}
