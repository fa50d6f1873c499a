//! Filesystem helpers shared by the modules that keep state on disk, and the one place that
//! names the state directory's layout ([`StateLayout`]).

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

/// Creates `path` and any missing parents with mode 0700 (whatever the umask adds), so that
/// state directories nbdcrypt creates are never group- or world-writable. Existing directories
/// are left as they are (`commands::check_state_dir` refuses loose ones).
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// The layout of a state directory, named once:
///
/// ```text
/// STATE/volumes/NAME.json   registry entry (no key material)
/// STATE/volumes/NAME.img    default backing file of volume NAME
/// STATE/kms/keys.json       the local KMS store (mode 0600)
/// STATE/audit.log           one JSON line per key operation
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    root: std::path::PathBuf,
}

impl StateLayout {
    /// The layout under `root`.
    pub fn new(root: &Path) -> Self {
        StateLayout {
            root: root.to_owned(),
        }
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The volume registry directory.
    pub fn registry(&self) -> std::path::PathBuf {
        self.root.join("volumes")
    }

    /// The registry entry of volume `name` (the name is already validated).
    pub fn entry(&self, name: &str) -> std::path::PathBuf {
        self.registry().join(format!("{name}.json"))
    }

    /// The default backing file of volume `name`.
    pub fn default_backing(&self, name: &str) -> std::path::PathBuf {
        self.registry().join(format!("{name}.img"))
    }

    /// The local KMS directory.
    pub fn kms_dir(&self) -> std::path::PathBuf {
        self.root.join("kms")
    }

    /// The local KMS store.
    pub fn kms_store(&self) -> std::path::PathBuf {
        self.kms_dir().join("keys.json")
    }

    /// The audit log.
    pub fn audit_log(&self) -> std::path::PathBuf {
        self.root.join("audit.log")
    }
}
