//! The local KMS's state on disk: keys, their material versions, aliases.
//!
//! One JSON file, `<state-dir>/kms/keys.json`, mode 0600 in a 0700 directory, written
//! atomically (temporary file, fsync, rename, fsync of the directory) so a crash leaves either
//! the old or the new state. Key material is stored as hex in that file: its protection at rest
//! is the file mode and whatever protects the state directory (see `docs/kms.md`). Loading
//! refuses a file that is group- or world-accessible.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::{Cause, KeyManager, KeyState, KmsError, Origin};

/// One version of a key's material.
#[derive(Clone, Serialize, Deserialize)]
pub struct Material {
    /// Version number (1, 2, …).
    pub version: u32,
    /// When it was created or imported.
    pub created: u64,
    /// How it came to be: `creation`, `automatic`, `on-demand`, `import`.
    pub kind: String,
    /// 32 bytes, hex.
    pub hex: String,
}

impl Drop for Material {
    fn drop(&mut self) {
        self.hex.zeroize();
    }
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("version", &self.version)
            .field("created", &self.created)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// One KMS key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    /// UUID.
    pub id: String,
    /// Description.
    pub description: String,
    /// Who manages it.
    pub manager: KeyManager,
    /// Where its material came from.
    pub origin: Origin,
    /// State.
    pub state: KeyState,
    /// Creation time.
    pub created: u64,
    /// When a pending deletion completes.
    pub deletion_date: Option<u64>,
    /// Yearly automatic rotation on.
    pub rotation_enabled: bool,
    /// Material versions, oldest first; the last one encrypts.
    pub materials: Vec<Material>,
    /// The key policy (AWS JSON); `None` means the default policy for the key's manager.
    #[serde(default)]
    pub policy: Option<String>,
    /// Active grants.
    #[serde(default)]
    pub grants: Vec<Grant>,
}

/// A grant: lets `grantee` perform `operations` on the key, optionally only for requests whose
/// encryption context satisfies the constraints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Grant id.
    pub grant_id: String,
    /// Optional name.
    pub name: String,
    /// Who may use it.
    pub grantee: String,
    /// Who may retire it (besides the grantee and the key's administrators).
    pub retiring_principal: Option<String>,
    /// Allowed operations (AWS names: `Decrypt`, `GenerateDataKey`, `ReEncryptFrom`, …).
    pub operations: Vec<String>,
    /// `EncryptionContextSubset`: these pairs must be present in the request's context.
    #[serde(default)]
    pub context_subset: BTreeMap<String, String>,
    /// `EncryptionContextEquals`: the request's context must be exactly this (when non-empty).
    #[serde(default)]
    pub context_equals: BTreeMap<String, String>,
    /// Creation time.
    pub created: u64,
}

/// The whole local KMS state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// Keys by id.
    pub keys: BTreeMap<String, KeyRecord>,
    /// `alias/NAME` → key id.
    pub aliases: BTreeMap<String, String>,
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    file: PathBuf,
}

fn unavailable(op: &'static str, cause: Cause) -> KmsError {
    KmsError::Unavailable {
        operation: op,
        cause,
    }
}

impl Store {
    /// The store under `<state_dir>/kms`.
    pub fn new(state_dir: &Path) -> Store {
        let layout = crate::fsutil::StateLayout::new(state_dir);
        Store {
            dir: layout.kms_dir(),
            file: layout.kms_store(),
        }
    }

    fn file(&self) -> PathBuf {
        self.file.clone()
    }

    /// Loads the state (empty if none exists yet).
    pub fn load(&self, op: &'static str) -> Result<State, KmsError> {
        let path = self.file();
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    version: 1,
                    ..State::default()
                });
            }
            Err(e) => {
                return Err(unavailable(
                    op,
                    Cause::context(format!("cannot read {}", path.display()), e),
                ));
            }
        };
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(unavailable(
                op,
                Cause::msg(format!(
                    "refusing the local KMS store {}: mode {:o} lets others read key material (chmod 600)",
                    path.display(),
                    meta.permissions().mode() & 0o777
                )),
            ));
        }
        let mut text = std::fs::read_to_string(&path).map_err(|e| {
            unavailable(
                op,
                Cause::context(format!("cannot read {}", path.display()), e),
            )
        })?;
        let parsed = serde_json::from_str::<State>(&text);
        text.zeroize();
        let state = parsed.map_err(|e| {
            unavailable(
                op,
                Cause::context(
                    format!(
                        "the local KMS store {} is corrupt (restore it from a backup)",
                        path.display()
                    ),
                    e,
                ),
            )
        })?;
        if state.version != 1 {
            return Err(unavailable(
                op,
                Cause::msg(format!(
                    "unsupported local KMS store version {}",
                    state.version
                )),
            ));
        }
        Ok(state)
    }

    /// Saves the state atomically.
    pub fn save(&self, op: &'static str, state: &State) -> Result<(), KmsError> {
        let fail = |e: std::io::Error| {
            unavailable(
                op,
                Cause::context(format!("cannot write {}", self.dir.display()), e),
            )
        };
        crate::fsutil::create_private_dir(&self.dir).map_err(fail)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(fail)?;
        let tmp = self
            .dir
            .join(format!("keys.json.tmp-{}", std::process::id()));
        let mut text =
            serde_json::to_vec_pretty(state).map_err(|e| fail(std::io::Error::other(e)))?;
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.file())?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        text.zeroize();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(fail)
    }
}
