//! Payload buffers, reused across requests, and the server-wide memory bound.
//!
//! Every read reply and write payload lives in a [`Buffer`] taken from one [`BufferPool`] and
//! returned to it when the reply has been written (or the write applied). Reused buffers are
//! neither allocated nor zeroed again: a fresh 1 MiB `vec![0; n]` costs page faults and a
//! memset per request, which at 1 MiB requests is as much work as the cipher pass.
//!
//! Memory bound: a request's payload bytes are charged to its connection's budget
//! (`transmit::MAX_BUFFERED_BYTES`) and to the server's ([`BufferPool::budget`], set by
//! `serve --max-buffer-mib`) before its buffer is taken, and are released only after the reply
//! has left. Idle buffers kept for reuse are capped separately ([`RETAINED_BYTES`]). So the
//! payload memory of the whole server is at most the server budget plus the retained cap.

use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// Idle buffer bytes kept for reuse, server-wide.
pub const RETAINED_BYTES: usize = 64 * 1024 * 1024;

/// Default server-wide payload budget.
pub const DEFAULT_SERVER_BUDGET_BYTES: usize = 1024 * 1024 * 1024;

/// The pool of idle buffers and the server-wide payload budget.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Free>,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
}

#[derive(Debug, Default)]
struct Free {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufferPool {
    /// A pool whose in-flight payloads may total `budget_bytes`.
    pub fn new(budget_bytes: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            free: Mutex::new(Free::default()),
            budget: Arc::new(Semaphore::new(
                budget_bytes.clamp(1, Semaphore::MAX_PERMITS),
            )),
            budget_bytes,
        })
    }

    /// The server-wide payload budget (permits are bytes).
    pub fn budget(&self) -> &Arc<Semaphore> {
        &self.budget
    }

    /// The budget in bytes.
    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    /// A buffer of exactly `len` bytes. Its contents are unspecified (old payloads); callers
    /// overwrite all of it.
    pub fn take(self: &Arc<Self>, len: usize) -> Buffer {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            // Best fit among the idle buffers: the smallest one that is long enough.
            let pick = free
                .bufs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            pick.map(|i| {
                let b = free.bufs.swap_remove(i);
                free.bytes -= b.capacity();
                b
            })
        };
        let data = match reused {
            // A buffer taken over from a store may hold fewer bytes than it has room for.
            Some(mut b) if b.len() < len => {
                b.resize(len, 0);
                b
            }
            Some(b) => b,
            None => vec![0u8; len],
        };
        Buffer {
            data,
            len,
            pool: Arc::clone(self),
        }
    }

    fn give_back(&self, data: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        // Counted by capacity: a buffer taken over from a store can be larger than its length.
        if free.bytes + data.capacity() <= RETAINED_BYTES {
            free.bytes += data.capacity();
            free.bufs.push(data);
        }
    }

    /// Idle bytes kept (for tests and logs).
    pub fn retained_bytes(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

/// A payload buffer; returns to its pool on drop.
#[derive(Debug)]
pub struct Buffer {
    data: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

/// A read lands in the store's receive buffer: this buffer's allocation goes to the store in
/// exchange, so both pools keep their count of buffers.
impl crate::storage::ReadBuffer for Buffer {
    fn take_over(&mut self, received: &mut Vec<u8>) -> bool {
        if received.len() != self.len {
            return false;
        }
        std::mem::swap(&mut self.data, received);
        true
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer that takes over a store's receive buffer holds its bytes without a copy, hands
    /// its own allocation over in exchange, and returns the received one to the pool.
    #[test]
    fn take_over_exchanges_allocations_and_keeps_the_pool_whole() {
        use crate::storage::ReadBuffer;
        let pool = BufferPool::new(1 << 20);
        let mut b = pool.take(4096);
        let own = b.as_ptr();
        let mut received = vec![7u8; 4096];
        let theirs = received.as_ptr();
        assert!(!b.take_over(&mut vec![7u8; 4095]), "only the same length");
        assert!(b.take_over(&mut received));
        assert!(b.iter().all(|&x| x == 7) && b.len() == 4096);
        assert_eq!((b.as_ptr(), received.as_ptr()), (theirs, own));
        drop(b);
        assert_eq!(
            pool.take(4096).as_ptr(),
            theirs,
            "the received buffer is pooled"
        );
    }

    /// A store's receive buffer can be shorter than its allocation (the store cut a larger
    /// one down): the pool counts it by its allocation, against the cap, and reuses it for a
    /// request as large as that allocation.
    #[test]
    fn a_taken_over_buffer_counts_and_serves_by_its_allocation() {
        use crate::storage::ReadBuffer;
        let pool = BufferPool::new(4 << 20);
        let mut b = pool.take(4096);
        let mut received = Vec::with_capacity(1 << 20);
        received.resize(4096, 7u8);
        let big = received.as_ptr();
        assert!(b.take_over(&mut received));
        drop(b);
        assert!(
            pool.retained_bytes() >= 1 << 20,
            "{}",
            pool.retained_bytes()
        );
        let again = pool.take(1 << 20);
        assert_eq!((again.as_ptr(), again.len()), (big, 1 << 20));
    }

    #[test]
    fn pool_reused_buffer_is_the_same_allocation() {
        let pool = BufferPool::new(1 << 20);
        let a = pool.take(4096);
        let ptr = a.as_ptr();
        drop(a);
        let b = pool.take(1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(b.as_ptr(), ptr, "the idle buffer is reused");
        let c = pool.take(8192);
        assert_ne!(c.as_ptr(), ptr);
        assert_eq!(c.len(), 8192);
    }

    #[test]
    fn pool_retained_bytes_are_capped() {
        let pool = BufferPool::new(1 << 20);
        let bufs: Vec<Buffer> = (0..5).map(|_| pool.take(RETAINED_BYTES / 4)).collect();
        drop(bufs);
        assert!(pool.retained_bytes() <= RETAINED_BYTES);
        assert_eq!(pool.retained_bytes(), RETAINED_BYTES);
    }
}
