//! Striped sector locks for writes.
//!
//! Sectors are grouped into stripes of [`SECTORS_PER_STRIPE`]; stripes hash onto [`LOCKS`]
//! reader-writer locks. A write takes the lock of every stripe it touches: exclusively where it
//! read-modify-writes a partial sector, shared elsewhere. Locks are always taken in ascending
//! index order, so two writes can never deadlock.
//!
//! A submitted write (whole sectors, in flight on the network while no thread waits for it)
//! cannot hold a guard: it **pins** its stripes instead ([`StripeLocks::try_pin`]), which it
//! may do only while no exclusive holder is there, and an exclusive holder waits until no pin
//! is left on its stripes before it reads the sector it is about to modify.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

/// Sectors per stripe.
const SECTORS_PER_STRIPE: u64 = 16;
/// Number of locks.
const LOCKS: usize = 256;

/// The lock table of one volume.
#[derive(Debug)]
pub struct StripeLocks {
    locks: Box<[RwLock<()>]>,
    /// Submitted writes in flight, per lock.
    pins: Box<[AtomicU32]>,
}

/// Held locks; released on drop.
#[derive(Debug)]
#[allow(dead_code)] // the guards are held for their Drop, never read
pub enum Held<'a> {
    /// Shared.
    Shared(RwLockReadGuard<'a, ()>),
    /// Exclusive.
    Exclusive(RwLockWriteGuard<'a, ()>),
}

/// Stripes pinned by a submitted write; give them back with [`StripeLocks::unpin`].
#[derive(Debug)]
pub struct Pin(Vec<usize>);

impl StripeLocks {
    /// A fresh table.
    pub fn new() -> Self {
        StripeLocks {
            locks: (0..LOCKS).map(|_| RwLock::new(())).collect(),
            pins: (0..LOCKS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn index(sector: u64) -> usize {
        // LOCKS is a power of two well below u64::MAX; the result is < LOCKS.
        usize::try_from((sector / SECTORS_PER_STRIPE) % LOCKS as u64).unwrap_or(0)
    }

    /// The locks a write of sectors `first..first+count` needs, in ascending order, each
    /// `true` where exclusive (the stripe of a partial first or last sector).
    fn wanted(
        first: u64,
        count: u64,
        head_partial: bool,
        tail_partial: bool,
    ) -> BTreeMap<usize, bool> {
        let mut wanted: BTreeMap<usize, bool> = BTreeMap::new();
        if count > 0 {
            let first_stripe = first / SECTORS_PER_STRIPE;
            let last_stripe = (first + count - 1) / SECTORS_PER_STRIPE;
            if last_stripe - first_stripe + 1 >= LOCKS as u64 {
                for i in 0..LOCKS {
                    wanted.insert(i, false);
                }
            } else {
                for s in first_stripe..=last_stripe {
                    wanted.insert(Self::index(s * SECTORS_PER_STRIPE), false);
                }
            }
            if head_partial {
                wanted.insert(Self::index(first), true);
            }
            if tail_partial {
                wanted.insert(Self::index(first + count - 1), true);
            }
        }
        wanted
    }

    /// Locks for a write of sectors `first..first+count`, exclusive on the stripes of a partial
    /// first or last sector. An exclusive lock is held only once no submitted write pins it.
    pub fn lock_for_write(
        &self,
        first: u64,
        count: u64,
        head_partial: bool,
        tail_partial: bool,
    ) -> Vec<Held<'_>> {
        Self::wanted(first, count, head_partial, tail_partial)
            .into_iter()
            .map(|(i, exclusive)| {
                let lock = &self.locks[i];
                if exclusive {
                    let held = lock.write().unwrap_or_else(|e| e.into_inner());
                    self.wait_unpinned(i);
                    Held::Exclusive(held)
                } else {
                    Held::Shared(lock.read().unwrap_or_else(|e| e.into_inner()))
                }
            })
            .collect()
    }

    /// Pins the stripes of a whole-sector write of sectors `first..first+count` without
    /// waiting; `None` while another write holds one of them exclusively (the caller then
    /// writes the waiting way). A pin stands for a shared hold until [`unpin`](Self::unpin).
    pub fn try_pin(&self, first: u64, count: u64) -> Option<Pin> {
        let indices: Vec<usize> = Self::wanted(first, count, false, false)
            .into_keys()
            .collect();
        // Pinned under shared guards: an exclusive holder either came before (and the pin is
        // refused) or comes after and sees the pin.
        let mut guards = Vec::with_capacity(indices.len());
        for &i in &indices {
            guards.push(self.locks[i].try_read().ok()?);
        }
        for &i in &indices {
            self.pins[i].fetch_add(1, Ordering::AcqRel);
        }
        drop(guards);
        Some(Pin(indices))
    }

    /// Releases what [`try_pin`](Self::try_pin) pinned.
    pub fn unpin(&self, pin: &Pin) {
        for &i in &pin.0 {
            self.pins[i].fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Waits, holding lock `i` exclusively, until no submitted write pins it (a write in
    /// flight upstream: normally a round trip, at most the upstream timeout).
    fn wait_unpinned(&self, i: usize) {
        let mut pause = Duration::from_micros(20);
        while self.pins[i].load(Ordering::Acquire) != 0 {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}

impl Default for StripeLocks {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn a_pin_is_refused_while_a_sector_is_modified() {
        let locks = StripeLocks::new();
        let held = locks.lock_for_write(0, 1, true, false);
        assert!(
            locks.try_pin(0, 16).is_none(),
            "pinned under an exclusive hold"
        );
        assert!(locks.try_pin(16, 16).is_some(), "another stripe is free");
        drop(held);
        let pin = locks.try_pin(0, 16).expect("free again");
        locks.unpin(&pin);
    }

    #[test]
    fn a_read_modify_write_waits_for_the_pinned_write() {
        let locks = Arc::new(StripeLocks::new());
        let pin = locks.try_pin(32, 4).expect("nothing held");
        // Shared holders are not held up by a pin.
        drop(locks.lock_for_write(32, 4, false, false));
        let entered = Arc::new(AtomicBool::new(false));
        let rmw = {
            let (locks, entered) = (Arc::clone(&locks), Arc::clone(&entered));
            std::thread::spawn(move || {
                let _held = locks.lock_for_write(33, 1, true, true);
                entered.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !entered.load(Ordering::SeqCst),
            "modified a sector under a pinned write"
        );
        locks.unpin(&pin);
        rmw.join().expect("the read-modify-write ends");
        assert!(entered.load(Ordering::SeqCst));
    }
}
