//! What each subcommand does. Each `run` writes its report to the given writer, so that tests
//! can read it without spawning the binary.

pub mod benchmark;
pub mod export;
pub mod guard;
pub mod info;
pub mod kms;
pub mod privileges;
pub mod progress;
pub mod serve;
pub mod volume;
pub mod volume_ops;

use std::path::Path;

use crate::kms::KeyService;
use crate::kms::KmsError;

/// The state directory (volume registry, local KMS store, audit log) may be writable by its
/// owner only: anyone else who can write it could swap the key store or the registry (point a
/// volume at a file they control). Checked before any command uses it; a missing directory is
/// fine (it is created 0700 when first needed).
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing the state directory {path}: mode {mode:o} lets other users change volumes and keys (chmod go-w {path})"
)]
pub struct StateDirError {
    /// The directory.
    pub path: String,
    /// Its permission bits.
    pub mode: u32,
}

/// Checks `state` and, within it, the local KMS directory for group or world write access.
pub fn check_state_dir(state: &Path) -> Result<(), StateDirError> {
    use std::os::unix::fs::PermissionsExt;
    for dir in [
        state.to_path_buf(),
        crate::fsutil::StateLayout::new(state).kms_dir(),
    ] {
        if let Ok(meta) = std::fs::metadata(&dir) {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o022 != 0 {
                return Err(StateDirError {
                    path: dir.display().to_string(),
                    mode,
                });
            }
        }
    }
    Ok(())
}

/// The key service the global options select, and its name for volume headers.
pub fn key_service(
    kind: crate::kms::KmsKind,
    endpoint: Option<&str>,
    region: Option<&str>,
    attempts: u32,
    state: &Path,
) -> Result<(Box<dyn KeyService>, &'static str), KmsError> {
    if kind == crate::kms::KmsKind::Aws {
        let settings = crate::kms::aws::AwsSettings {
            endpoint: endpoint.map(str::to_owned),
            region: region.map(str::to_owned),
            service_principal: std::env::var("NBDCRYPT_AWS_SERVICE_PRINCIPAL").ok(),
            attempts,
        };
        Ok((
            Box::new(crate::kms::aws::AwsKms::connect(state, settings)?),
            kind.name(),
        ))
    } else {
        Ok((
            Box::new(crate::kms::local::LocalKms::open(state)),
            kind.name(),
        ))
    }
}
