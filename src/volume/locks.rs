//! Striped sector locks for writes.
//!
//! Sectors are grouped into stripes of [`SECTORS_PER_STRIPE`]; stripes hash onto [`LOCKS`]
//! reader-writer locks. A write takes the lock of every stripe it touches: exclusively where it
//! read-modify-writes a partial sector, shared elsewhere. Locks are always taken in ascending
//! index order, so two writes can never deadlock.

use std::collections::BTreeMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Sectors per stripe.
const SECTORS_PER_STRIPE: u64 = 16;
/// Number of locks.
const LOCKS: usize = 256;

/// The lock table of one volume.
#[derive(Debug)]
pub struct StripeLocks {
    locks: Box<[RwLock<()>]>,
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

impl StripeLocks {
    /// A fresh table.
    pub fn new() -> Self {
        StripeLocks {
            locks: (0..LOCKS).map(|_| RwLock::new(())).collect(),
        }
    }

    fn index(sector: u64) -> usize {
        // LOCKS is a power of two well below u64::MAX; the result is < LOCKS.
        usize::try_from((sector / SECTORS_PER_STRIPE) % LOCKS as u64).unwrap_or(0)
    }

    /// Locks for a write of sectors `first..first+count`, exclusive on the stripes of a partial
    /// first or last sector.
    pub fn lock_for_write(
        &self,
        first: u64,
        count: u64,
        head_partial: bool,
        tail_partial: bool,
    ) -> Vec<Held<'_>> {
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
            .into_iter()
            .map(|(i, exclusive)| {
                let lock = &self.locks[i];
                if exclusive {
                    Held::Exclusive(lock.write().unwrap_or_else(|e| e.into_inner()))
                } else {
                    Held::Shared(lock.read().unwrap_or_else(|e| e.into_inner()))
                }
            })
            .collect()
    }
}

impl Default for StripeLocks {
    fn default() -> Self {
        Self::new()
    }
}
