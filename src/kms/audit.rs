//! The audit log: one JSON line per key operation, appended to `<state-dir>/audit.log`.
//!
//! Records carry time, operation (AWS names), key, principal, volume, outcome and, on failure,
//! the error code and message. They never carry key material or wrapped blobs: the record type
//! has no field that could hold them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Unix seconds.
    pub time: u64,
    /// AWS operation name (`GenerateDataKey`, `Decrypt`, …).
    pub operation: String,
    /// Key ARN or the identifier asked for.
    pub key: String,
    /// Calling principal.
    pub principal: String,
    /// Volume name or id, when the call concerns one.
    pub volume: Option<String>,
    /// `success`, `failure` or `denied`.
    pub outcome: String,
    /// Error code on failure.
    pub error_code: Option<String>,
    /// Error message on failure.
    pub error_message: Option<String>,
    /// Why nbdcrypt made the call (`recheck`: `serve --kms-recheck` re-validating a served
    /// volume's key), when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
}

/// An append-only audit log file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    lock: Mutex<()>,
}

impl AuditLog {
    /// The log at `path` (created on first append, mode 0600).
    pub fn new(path: &Path) -> Self {
        AuditLog {
            path: path.to_owned(),
            lock: Mutex::new(()),
        }
    }

    /// Where the log lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and syncs it. An audit failure is returned: callers treat an
    /// operation whose audit record cannot be written as failed.
    pub fn append(&self, record: &Record) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dir) = self.path.parent() {
            crate::fsutil::create_private_dir(dir)?;
        }
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        // One write of the whole line: O_APPEND keeps concurrent writers' lines whole.
        f.write_all(&line)?;
        f.sync_data()
    }

    /// Records the outcome of one KMS operation (and counts it, with its latency since
    /// `started`, in the process's metrics). Returns the operation's own error, or an
    /// `Unavailable` error when the record cannot be written: an unaudited operation fails.
    #[allow(clippy::too_many_arguments)]
    pub fn outcome<T>(
        &self,
        time: u64,
        started: std::time::Instant,
        operation: &'static str,
        key: &str,
        principal: &str,
        purpose: Option<&str>,
        volume: Option<&str>,
        result: Result<T, super::KmsError>,
    ) -> Result<T, super::KmsError> {
        let (outcome, code, message) = match &result {
            Ok(_) => ("success", None, None),
            Err(e) => (
                if matches!(e, super::KmsError::AccessDenied { .. }) {
                    "denied"
                } else {
                    "failure"
                },
                Some(e.code().to_owned()),
                Some(e.to_string()),
            ),
        };
        crate::metrics::global().kms_call(operation, outcome, started);
        let record = Record {
            time,
            operation: operation.to_owned(),
            key: key.to_owned(),
            principal: principal.to_owned(),
            volume: volume.map(str::to_owned),
            outcome: outcome.to_owned(),
            error_code: code,
            error_message: message,
            purpose: purpose.map(str::to_owned),
        };
        if let Err(e) = self.append(&record) {
            return Err(super::KmsError::Unavailable {
                operation,
                cause: super::Cause::context(
                    format!("cannot write the audit log {}", self.path.display()),
                    e,
                ),
            });
        }
        result
    }

    /// Every record, oldest first (unparsable lines are skipped).
    pub fn read_all(&self) -> std::io::Result<Vec<Record>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}
