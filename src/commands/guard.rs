//! The volume guard of `serve`: one thread that, for every served `--volume`, renews the
//! serving lease, notices a delete (registry tombstone or shredded header) or a lost lease,
//! and with `--kms-recheck` re-validates the wrapped key. Any of these withdraws the volume
//! at once: its export disappears, its connections are told to end (requests still in flight
//! fail with `ESHUTDOWN`), and its key schedules are wiped from memory.
//!
//! It is a plain thread, not a tokio task: the KMS clients are synchronous (the AWS one runs
//! its own runtime), and a lease renewal is a durable write.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::kms::KmsError;
use crate::server::Exports;
use crate::volume::lease::{Renewal, ServingLease};
use crate::volume::manager::{Manager, ManagerError};

/// How often deletion and the lease's owner are checked (one 8 KiB read of the header).
const TICK: Duration = Duration::from_millis(250);

/// Settings.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// Lease renewal interval.
    pub lease_interval: Duration,
    /// KMS re-validation interval (`None`: off).
    pub kms_recheck: Option<Duration>,
    /// The state directory whose registry `volume delete` writes.
    pub state_dir: PathBuf,
}

/// KMS answers that mean the key may no longer be used.
fn revokes(e: &KmsError) -> bool {
    matches!(
        e,
        KmsError::Disabled { .. }
            | KmsError::AccessDenied { .. }
            | KmsError::InvalidState { .. }
            | KmsError::NotFound { .. }
    )
}

/// What to do with one volume after a check.
enum Verdict {
    Keep,
    /// Withdraw; `release`: the lease is still ours and the volume intact, so clear it.
    Withdraw {
        reason: String,
        release: bool,
    },
}

fn check(
    lease: &ServingLease,
    manager: &Manager<'_>,
    cfg: &GuardConfig,
    renew: bool,
    recheck: bool,
) -> Verdict {
    let name = lease.name();
    if crate::volume::manager::is_deleted(&cfg.state_dir, name) {
        return Verdict::Withdraw {
            reason: "it was deleted (volume delete --force)".into(),
            release: false,
        };
    }
    let seen = if renew { lease.renew() } else { lease.check() };
    match seen {
        Ok(Renewal::Renewed) => {}
        Ok(Renewal::Deleted) => {
            return Verdict::Withdraw {
                reason: "its header says it was deleted".into(),
                release: false,
            };
        }
        Ok(Renewal::Lost(holder)) => {
            return Verdict::Withdraw {
                reason: format!(
                    "its lease was taken over by {}",
                    holder.map_or_else(|| "nobody (cleared)".into(), |h| h.to_string())
                ),
                release: false,
            };
        }
        // Both copies unreadable: `volume delete` wiped unreadable headers, or the store is
        // gone. Serving on would write into a volume that no longer exists.
        Err(ManagerError::Header { first, second, .. }) => {
            return Verdict::Withdraw {
                reason: format!("its header is gone ({first}; {second})"),
                release: false,
            };
        }
        Err(e) if renew => {
            tracing::warn!(volume = name, error = %e, "lease renewal failed; retrying next interval")
        }
        Err(_) => {}
    }
    if recheck {
        match manager.recheck(name, lease.store()) {
            Ok(()) => tracing::debug!(volume = name, "KMS recheck: key still usable"),
            Err(ManagerError::Kms { source, .. }) if revokes(&source) => {
                return Verdict::Withdraw {
                    reason: format!("KMS recheck: {source}"),
                    release: true,
                };
            }
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "KMS recheck failed; keeping the volume (the key was not revoked, the check could not be made)")
            }
        }
    }
    Verdict::Keep
}

/// Follows `volume resize`: new connections are told the size the header now gives (only
/// ever larger, and only when the store holds it).
fn grow(exports: &Exports, lease: &ServingLease) {
    let size = lease.header_size();
    let Some(export) = exports.find(lease.name()) else {
        return;
    };
    if size <= export.volume.size() {
        return;
    }
    let fits = lease
        .store()
        .size()
        .is_ok_and(|have| have >= crate::volume::header::DATA_OFFSET + size);
    if !fits {
        tracing::warn!(
            volume = lease.name(),
            size,
            "the header says the volume grew, but its backing store is shorter; keeping the old size"
        );
        return;
    }
    match export.volume.grow(size) {
        Ok(true) => tracing::info!(
            volume = lease.name(),
            size,
            "volume grown: new connections see the new size (connections already open keep theirs)"
        ),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(volume = lease.name(), error = %e, "cannot grow the served volume")
        }
    }
}

/// Withdraws `name` from `exports` and wipes its key now.
pub fn withdraw(exports: &Exports, name: &str, reason: &str) {
    let Some(export) = exports.withdraw(name) else {
        return;
    };
    tracing::warn!(
        volume = name,
        reason,
        "volume withdrawn: its connections are closed and requests in flight fail"
    );
    export.volume.destroy_key();
    tracing::warn!(volume = name, "volume key destroyed in memory");
}

/// Runs until `stop` fires (or its sender goes), then releases the remaining leases.
pub fn run(
    exports: &Exports,
    mut leases: Vec<ServingLease>,
    manager: &Manager<'_>,
    cfg: &GuardConfig,
    stop: &mpsc::Receiver<()>,
) {
    let mut next_renew = Instant::now() + cfg.lease_interval;
    let mut next_recheck = cfg.kms_recheck.map(|d| Instant::now() + d);
    while !leases.is_empty() {
        match stop.recv_timeout(TICK) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        let renew = now >= next_renew;
        if renew {
            next_renew = now + cfg.lease_interval;
        }
        let recheck = next_recheck.is_some_and(|t| now >= t);
        if recheck {
            next_recheck = cfg.kms_recheck.map(|d| now + d);
        }
        let mut kept = Vec::with_capacity(leases.len());
        for lease in leases {
            match check(&lease, manager, cfg, renew, recheck) {
                Verdict::Keep => {
                    grow(exports, &lease);
                    kept.push(lease);
                }
                Verdict::Withdraw { reason, release } => {
                    withdraw(exports, lease.name(), &reason);
                    if release && let Err(e) = lease.release() {
                        tracing::warn!(error = %e, "could not release the lease");
                    }
                }
            }
        }
        leases = kept;
    }
    // Drain what is left after a stop (or if every volume went).
    while stop.try_recv().is_ok() {}
    for lease in leases {
        let name = lease.name().to_owned();
        match lease.release() {
            Ok(()) => tracing::info!(volume = name, "lease released"),
            Err(e) => tracing::warn!(volume = name, error = %e, "could not release the lease"),
        }
    }
}
