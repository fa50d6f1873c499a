//! The connection's watchdog: an upstream that stops answering without closing its connection
//! (a stopped process, a storage node that lost power behind a TCP connection that nobody
//! resets) would leave every request on it waiting for good. The watchdog drops the connection
//! once its oldest request has waited longer than the upstream timeout: the reader then fails
//! every request on it, and `Session` reconnects or gives up (EIO), as for a lost connection.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::replies::{Pending, lock};
use super::sock::Sock;

/// A running watchdog; stopped when dropped.
pub(super) struct Watchdog {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Watches the requests in `pending`; shuts `socket` down once one has waited longer
    /// than `limit`.
    pub(super) fn start(
        limit: Duration,
        pending: Arc<Mutex<Pending>>,
        socket: Sock,
    ) -> std::io::Result<Watchdog> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("nbdcrypt-upwatch".into())
                .spawn(move || watch(limit, &pending, &socket, &stop))?
        };
        Ok(Watchdog {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *lock(&self.stop.0) = true;
        self.stop.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Looks a few times per `limit` (at least every second) at the oldest request in flight.
fn watch(limit: Duration, pending: &Mutex<Pending>, socket: &Sock, stop: &(Mutex<bool>, Condvar)) {
    let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut stopped = lock(&stop.0);
    loop {
        stopped = stop
            .1
            .wait_timeout(stopped, tick)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
        if *stopped {
            return;
        }
        let mut p = lock(pending);
        if p.dead.is_some() {
            return;
        }
        let oldest = p.waiters.values().map(|w| w.since).min();
        if let Some(waited) = oldest.map(|t| Instant::now().saturating_duration_since(t))
            && waited > limit
        {
            // Refuses new requests at once; the reader fails those in flight with this reason.
            p.dead = Some(format!(
                "no reply for {:.1} s (--upstream-timeout {:.1} s): the connection was dropped",
                waited.as_secs_f64(),
                limit.as_secs_f64()
            ));
            drop(p);
            socket.shutdown();
            return;
        }
    }
}
