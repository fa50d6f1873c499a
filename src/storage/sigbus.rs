//! Turns a `SIGBUS` in a read-only mapping of a backing file back into an error value.
//!
//! A mapped page whose backing cannot be read (an I/O error; a file truncated under us by
//! another process) raises `SIGBUS` on access, which would kill the server. Every mapping that
//! serving reads go through is registered here. On `SIGBUS` inside a registered mapping the
//! handler marks that mapping *faulted* and puts a private zero page where the bad page was,
//! so that the access completes; the reader sees the mark when it is done and discards what it
//! read. Once faulted, a mapping is not read again (its zero page would read as a hole): every
//! later read of that store goes through `pread`, which reports the error as an error.
//!
//! Order inside the handler: the mark is set *before* the page is replaced, and readers check
//! the mark *after* their access, so no reader can return bytes of the zero page unmarked.
//!
//! A `SIGBUS` outside every registered mapping is not ours: the handler puts the previous
//! action back (Rust's own stack-overflow handler, or the default) and returns, so the access
//! faults again and meets it.
#![allow(unsafe_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How many mappings can be guarded at once (one per served file-backed volume).
const SLOTS: usize = 256;

struct Slot {
    /// First byte of the mapping; 0 while the slot is free.
    start: AtomicUsize,
    /// One past its last byte; 0 while the slot is free.
    end: AtomicUsize,
    /// Set by the handler when an access in the mapping faulted.
    faulted: AtomicBool,
    /// Taken by a registration.
    taken: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
    taken: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The action `SIGBUS` had before ours (read by the handler, written once before it is
/// installed).
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// A registered mapping; unregisters on drop (before the mapping itself is unmapped).
#[derive(Debug)]
pub(super) struct Guard {
    slot: usize,
}

impl Guard {
    /// Registers `start..start+len`, installing the handler on first use. `None` when the
    /// handler could not be installed or every slot is taken: the caller must not map.
    pub(super) fn register(start: usize, len: usize) -> Option<Guard> {
        if !install() {
            return None;
        }
        let slot = TABLE.iter().position(|s| {
            s.taken
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })?;
        let s = &TABLE[slot];
        s.faulted.store(false, Ordering::SeqCst);
        s.start.store(start, Ordering::SeqCst);
        s.end.store(start.saturating_add(len), Ordering::SeqCst);
        Some(Guard { slot })
    }

    /// Whether an access in the mapping has faulted since it was registered.
    pub(super) fn faulted(&self) -> bool {
        TABLE[self.slot].faulted.load(Ordering::SeqCst)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.end.store(0, Ordering::SeqCst);
        s.start.store(0, Ordering::SeqCst);
        s.taken.store(false, Ordering::Release);
    }
}

/// Installs the handler once per process; whether it is in place.
fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(p) = usize::try_from(page)
            && p.is_power_of_two()
        {
            PAGE.store(p, Ordering::SeqCst);
        }
        // SAFETY: a zeroed sigaction is a valid value to be overwritten by the kernel.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: reading the current action into a local.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
            return false;
        }
        if PREVIOUS.set(old).is_err() {
            return false;
        }
        // SAFETY: as above; every field the kernel reads is set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sa_mask is a local sigset_t.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: installs a handler that only touches atomics, statics initialised before
        // this call, and async-signal-safe system calls (mmap, sigaction).
        unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) == 0 }
    })
}

extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for s in &TABLE {
        let start = s.start.load(Ordering::SeqCst);
        let end = s.end.load(Ordering::SeqCst);
        if start == 0 || addr < start || addr >= end {
            continue;
        }
        s.faulted.store(true, Ordering::SeqCst);
        let at = addr & !(page - 1);
        // SAFETY: replaces one page inside a mapping this process made and still holds (the
        // slot is cleared before it is unmapped) with a private anonymous zero page.
        let r = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            return;
        }
        break;
    }
    // Not ours (or the page could not be replaced): the previous action handles the repeat.
    if let Some(previous) = PREVIOUS.get() {
        // SAFETY: restores the action read at install time.
        unsafe { libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut()) };
    } else {
        // SAFETY: resets to the default action.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }
}
