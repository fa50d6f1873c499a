//! `volume resize` and `volume reencrypt`: the commands that change a volume's size or its
//! data key in place. Generic over the caller's error type, so that this file does not depend
//! on `commands::volume`, which dispatches to it.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::crypto::BackendChoice;
use crate::human::iec_bytes;
use crate::volume::manager::{Manager, ManagerError};

/// `volume resize NAME --size S`.
pub fn resize<E: From<ManagerError> + From<std::io::Error>>(
    m: &Manager<'_>,
    name: &str,
    size: u64,
    out: &mut impl Write,
) -> Result<(), E> {
    let r = m.resize(name, size)?;
    if r.old_size == r.header.size {
        writeln!(out, "volume {name} is already {}", iec_bytes(r.old_size))?;
        return Ok(());
    }
    writeln!(
        out,
        "volume {name} grown from {} to {}",
        iec_bytes(r.old_size),
        iec_bytes(r.header.size)
    )?;
    if r.served {
        writeln!(
            out,
            "it is being served: new connections see the new size; a client attached now keeps the old one until it reconnects (then grow the file system, e.g. resize2fs)"
        )?;
    }
    Ok(())
}

/// Emits progress lines at most every half second and at the end.
struct JsonProgress<'o, W: Write> {
    out: &'o mut W,
    last: Option<Instant>,
}

impl<W: Write> JsonProgress<'_, W> {
    fn report(&mut self, done: u64, total: u64) {
        let due = self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(500));
        if due || done == total {
            self.last = Some(Instant::now());
            let line = serde_json::json!({"event": "progress", "done": done, "total": total});
            let _ = writeln!(self.out, "{line}");
            let _ = self.out.flush();
        }
    }
}

/// `volume reencrypt NAME [--json]`: a progress bar on a terminal, JSON lines with `--json`;
/// Ctrl-C stops at a chunk boundary (resumable).
pub fn reencrypt<E: From<ManagerError> + From<std::io::Error>>(
    m: &Manager<'_>,
    name: &str,
    json: bool,
    backend: BackendChoice,
    out: &mut impl Write,
) -> Result<(), E> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&stop)) {
            tracing::warn!(error = %e, "cannot catch Ctrl-C: an interruption is then a crash (still resumable)");
        }
    }
    let started = Instant::now();
    let result = if json {
        let mut p = JsonProgress {
            out: &mut *out,
            last: None,
        };
        m.reencrypt(name, backend, |d, t| p.report(d, t), &stop)
    } else {
        let bar = super::progress::bytes(0, "re-encrypting");
        let r = m.reencrypt(
            name,
            backend,
            |d, t| {
                bar.set_length(t);
                bar.set_position(d);
            },
            &stop,
        );
        bar.finish_and_clear();
        r
    };
    let r = result?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        let line = serde_json::json!({
            "event": "done",
            "volume": name,
            "size": r.header.size,
            "resumed_at": r.resumed_at,
            "holes_kept_sectors": r.holes,
            "read_through_mapping": r.mapped,
            "seconds": secs,
        });
        writeln!(out, "{line}")?;
    } else {
        let resumed = r
            .resumed_at
            .map(|b| format!(" (resumed at {})", iec_bytes(b)))
            .unwrap_or_default();
        writeln!(
            out,
            "volume {name} re-encrypted under a new data key in {secs:.1} s{resumed}; the old key is destroyed"
        )?;
    }
    Ok(())
}
