//! Sector-parallel crypto workers.
//!
//! A pool of threads (one per core by default, `serve --workers N`) serves large reads and
//! writes. Such a request is split at sector boundaries into contiguous runs, one or two per
//! worker; each run is read and decrypted (or encrypted and written) by whichever worker takes
//! it, straight into or out of its own slice of the request buffer, so reassembly in order costs
//! nothing: the slices are the order. Runs never share a sector, so the volume's
//! read-modify-write locking of partial edge sectors holds run by run, and a split request
//! produces exactly the bytes of the unsplit one.
//!
//! Small requests never come here: they run inline on the connection's task, because handing
//! a 4 KiB request to another thread (a queue push, a wake-up, a cache miss on the other core)
//! costs more than decrypting it. The threshold between the two is
//! [`DEFAULT_SPLIT_BYTES`], measured with `scripts/split-sweep.sh` (see `BENCHMARKING.md`).
//!
//! Rule: no lock is held across a call into the pool. The volume's locking methods take no
//! closures; the one that takes a closure to run in the pool
//! ([`EncryptedVolume::seal_aligned`]) takes no lock (tests/pool_locks.rs).
//!
//! This module never sees key bytes; it calls the volume, which calls the crypto engine.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::volume::{EncryptedVolume, VolumeError};

/// Requests of at least this many bytes go to the workers and are split; smaller ones run
/// inline. Measured by `scripts/split-sweep.sh` on this project's reference machine: below 64 KiB
/// the hand-off cost more than it saved; from 128 KiB on, two workers beat one (see
/// `BENCHMARKING.md`, "Split threshold").
pub const DEFAULT_SPLIT_BYTES: usize = 128 * 1024;

/// The smallest run a split produces: below this a run's dispatch dominates its work.
pub const MIN_RUN_BYTES: usize = 64 * 1024;

/// Errors building the pool.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {threads} crypto workers: {source}")]
pub struct WorkersError {
    threads: usize,
    source: rayon::ThreadPoolBuildError,
}

/// The worker pool.
#[derive(Debug)]
pub struct Workers {
    pool: rayon::ThreadPool,
    threads: usize,
    split_bytes: usize,
    /// Jobs queued or running on the pool.
    busy: Arc<AtomicUsize>,
}

/// One run of a split request: the volume byte offset it starts at and its range in the
/// request buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Volume byte offset of the run's first byte.
    pub offset: u64,
    /// The run's bytes within the request buffer.
    pub range: Range<usize>,
}

/// Splits the request `offset..offset+len` into at most `runs` contiguous runs whose internal
/// boundaries fall on multiples of `sector` (absolute volume offsets), each at least
/// `min_run` bytes except when the whole request is shorter. The runs cover the request
/// exactly, in order.
pub fn split(offset: u64, len: usize, sector: usize, runs: usize, min_run: usize) -> Vec<Run> {
    let sector = sector.max(1);
    let wanted = runs.max(1).min(len / min_run.max(1)).max(1);
    let mut out = Vec::with_capacity(wanted);
    if wanted == 1 {
        out.push(Run {
            offset,
            range: 0..len,
        });
        return out;
    }
    // Inner boundaries: evenly spaced, then rounded down onto the volume's sectors (absolute
    // offsets, not buffer offsets); rounding may merge two, never add one.
    let per_run = len.div_ceil(wanted) as u64;
    let end_abs = offset + len as u64;
    let mut start_abs = offset;
    for k in 1..=wanted as u64 {
        let target = if k == wanted as u64 {
            end_abs
        } else {
            let t = offset + k * per_run;
            t - t % sector as u64
        };
        if target <= start_abs || target > end_abs {
            continue;
        }
        let (a, b) = (start_abs - offset, target - offset);
        out.push(Run {
            offset: start_abs,
            range: usize::try_from(a).unwrap_or(0)..usize::try_from(b).unwrap_or(len),
        });
        start_abs = target;
    }
    out
}

impl Workers {
    /// A pool of `threads` workers (0: one per core); requests of `split_bytes` or more are
    /// split across them.
    pub fn new(threads: usize, split_bytes: usize) -> Result<Self, WorkersError> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("nbdcrypt-worker-{i}"))
            // Without a handler rayon aborts the process on a panic in a spawned job.
            .panic_handler(|panic| {
                let what = crate::faults::panic_message(&*panic);
                tracing::error!(
                    panic = what,
                    "a crypto worker job panicked; the worker carries on"
                );
            })
            .build()
            .map_err(|source| WorkersError { threads, source })?;
        Ok(Workers {
            pool,
            threads,
            split_bytes: split_bytes.max(1),
            busy: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Requests this long or longer are split across the workers.
    pub fn split_bytes(&self) -> usize {
        self.split_bytes
    }

    /// Whether a request of `len` bytes runs inline on the connection's task.
    pub fn inline(&self, len: usize) -> bool {
        len < self.split_bytes
    }

    /// Runs `job` on a worker; it returns at once. The busy count goes back down however the
    /// job ends (a panic included: callers catch their own, see `execute_guarded`, and the
    /// pool's panic handler logs any other instead of aborting the process).
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        /// Decrements the busy count when dropped: on return and on unwinding.
        struct Done(Arc<AtomicUsize>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.busy.fetch_add(1, Ordering::Relaxed);
        let done = Done(Arc::clone(&self.busy));
        self.pool.spawn(move || {
            let _done = done;
            job();
        });
    }

    /// Jobs queued or running.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }

    /// The runs to cut a request into. A request is split only while other workers are idle:
    /// when every worker already has a request of its own (deep queues), splitting would add
    /// hand-offs and buy no parallelism.
    fn runs(&self, volume: &EncryptedVolume, offset: u64, len: usize) -> Vec<Run> {
        // `busy` counts this request too.
        let idle = self
            .threads
            .saturating_sub(self.busy.load(Ordering::Relaxed));
        let runs = if idle == 0 {
            1
        } else {
            // Two runs per worker that can take part, so one that finishes early takes another.
            (idle + 1) * 2
        };
        split(
            offset,
            len,
            volume.config().sector_size.bytes(),
            runs,
            MIN_RUN_BYTES,
        )
    }

    /// Reads `buf.len()` bytes at `offset`, split across the workers.
    pub fn read(
        &self,
        volume: &EncryptedVolume,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), VolumeError> {
        let runs = self.runs(volume, offset, buf.len());
        let slices = carve(buf, &runs);
        self.pool.install(|| {
            slices
                .into_par_iter()
                .try_for_each(|(off, chunk)| volume.read(off, chunk))
        })
    }

    /// Writes `data` at `offset` with the workers (`data` is encrypted in place). An aligned
    /// request is encrypted in parallel runs *before* any lock is taken
    /// ([`EncryptedVolume::seal_aligned`]) and then written with one call under the stripe
    /// locks ([`EncryptedVolume::write_sealed`]); an unaligned one is written run by run, in
    /// parallel, each run taking and releasing its own locks inside its job. No lock is ever
    /// held across `install`: a worker waiting in a join may steal any queued job. With
    /// `fua`, one flush follows.
    pub fn write(
        &self,
        volume: &EncryptedVolume,
        offset: u64,
        data: &mut [u8],
        fua: bool,
    ) -> Result<(), VolumeError> {
        let sector = volume.config().sector_size.bytes();
        if offset.is_multiple_of(sector as u64) && data.len().is_multiple_of(sector) {
            let runs = self.runs(volume, 0, data.len());
            let sealed = volume.seal_aligned(offset, data, |buf, encrypt| {
                let slices = carve(buf, &runs);
                self.pool.install(|| {
                    slices.into_par_iter().try_for_each(|(at, piece)| {
                        encrypt(usize::try_from(at).unwrap_or(usize::MAX), piece)
                    })
                })
            })?;
            return volume.write_sealed(sealed, fua);
        }
        let runs = self.runs(volume, offset, data.len());
        let slices = carve(data, &runs);
        self.pool.install(|| {
            slices
                .into_par_iter()
                .try_for_each(|(off, chunk)| volume.write(off, chunk, false))
        })?;
        if fua { volume.flush() } else { Ok(()) }
    }
}

/// Cuts `buf` into the runs' disjoint slices.
fn carve<'a>(mut buf: &'a mut [u8], runs: &[Run]) -> Vec<(u64, &'a mut [u8])> {
    let mut out = Vec::with_capacity(runs.len());
    for run in runs {
        let (head, rest) = buf.split_at_mut(run.range.len());
        out.push((run.offset, head));
        buf = rest;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(offset: u64, len: usize, sector: usize, runs: usize, min_run: usize) {
        let got = split(offset, len, sector, runs, min_run);
        assert!(!got.is_empty() && got.len() <= runs.max(1));
        let mut at = 0;
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.range.start, at, "runs are contiguous");
            assert!(r.range.end > r.range.start, "no empty run");
            assert_eq!(r.offset, offset + at as u64);
            if i > 0 {
                assert_eq!(r.offset % sector as u64, 0, "inner boundaries on sectors");
            }
            at = r.range.end;
        }
        assert_eq!(at, len, "runs cover the request");
    }

    #[test]
    fn split_any_request_covers_it_with_sector_aligned_inner_boundaries() {
        for sector in [512, 1024, 2048, 4096] {
            for offset in [0u64, 1, 511, 512, 4095, 4097, 1 << 20, (1 << 20) + 17] {
                for len in [
                    1usize,
                    511,
                    4096,
                    65_535,
                    65_536,
                    131_072,
                    1 << 20,
                    (1 << 20) + 3,
                ] {
                    for runs in [1, 2, 3, 4, 8] {
                        check(offset, len, sector, runs, MIN_RUN_BYTES);
                        check(offset, len, sector, runs, 1);
                    }
                }
            }
        }
    }

    #[test]
    fn split_large_request_uses_every_run() {
        let got = split(0, 1 << 20, 4096, 4, MIN_RUN_BYTES);
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|r| r.range.len() == 256 * 1024));
    }

    /// A panicking job neither aborts the process nor leaves the busy count raised.
    #[test]
    fn workers_survive_a_panicking_job_and_restore_their_count() {
        let w = Workers::new(2, DEFAULT_SPLIT_BYTES).unwrap();
        w.spawn(|| panic!("test panic in a worker job"));
        let (tx, rx) = std::sync::mpsc::channel();
        let start = std::time::Instant::now();
        while w.busy() != 0 {
            assert!(
                start.elapsed().as_secs() < 10,
                "busy count stuck at {}",
                w.busy()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        w.spawn(move || tx.send(42).unwrap());
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(),
            42
        );
    }

    #[test]
    fn split_small_request_stays_whole() {
        assert_eq!(split(100, 4096, 512, 8, MIN_RUN_BYTES).len(), 1);
    }
}
