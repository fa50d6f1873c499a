//! Reads that do not wait: on a remote store (an upstream NBD export) a small read is sent
//! upstream and the calling task moves on; the reply is decrypted on the thread that received
//! it. No thread sits blocked on the round trip, which on the proxy path cost two thread
//! switches per 4 KiB read (BENCHMARKING.md). Anything this path cannot do (an unaligned read,
//! a dead connection, an upstream error, a withdrawn key, a panic) hands the buffer back, and
//! the caller reads the waiting way, which retries, reconnects and reports the error.

use std::sync::Arc;

use super::EncryptedVolume;

impl EncryptedVolume {
    /// Starts reading `out.len()` plaintext bytes at `offset` into `out` without waiting.
    /// `done` runs exactly once, on another thread or (when the read cannot start) at once on
    /// this one: `Ok(out)` decrypted, or `Err(out)` for "read it with [`read`](Self::read)".
    pub fn submit_read<B, F>(self: &Arc<Self>, offset: u64, mut out: B, done: F)
    where
        B: std::ops::DerefMut<Target = [u8]> + Send + 'static,
        F: FnOnce(Result<B, B>) + Send + 'static,
    {
        let len = out.len();
        let sector = self.sector();
        let aligned = offset.is_multiple_of(sector) && (len as u64).is_multiple_of(sector);
        if len == 0 || !aligned || self.check(offset, len as u64).is_err() {
            return done(Err(out));
        }
        let first = offset / sector;
        let me = Arc::clone(self);
        let finish = Box::new(move |data: Option<&[u8]>| {
            let Some(src) = data else {
                return done(Err(out));
            };
            let decrypted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::faults::panic_point(offset);
                me.decrypt_from(first, src, &mut out)
            }));
            match decrypted {
                Ok(Ok(())) => done(Ok(out)),
                // The waiting read meets the same failure (a withdrawn key) or panic, and
                // answers it as every other request does.
                Ok(Err(_)) | Err(_) => done(Err(out)),
            }
        });
        if let Err(finish) = self
            .storage
            .submit_read(self.config.data_offset + offset, len, finish)
        {
            finish(None);
        }
    }
}
