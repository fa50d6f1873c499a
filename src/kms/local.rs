//! The embedded local KMS: AWS KMS semantics for symmetric keys, with no AWS account.
//!
//! * Keys are `SYMMETRIC_DEFAULT` only; asking for any other key spec is refused.
//! * An AWS-managed default key (`alias/aws/nbdcrypt`) is created on first use; customer keys
//!   have descriptions and aliases.
//! * States: Enabled, Disabled, PendingDeletion (7–30 days; cancelling returns the key to
//!   Disabled, as AWS does; after the window the key and all its material are destroyed and its
//!   blobs never decrypt again), PendingImport (EXTERNAL origin before material is imported).
//! * Rotation: automatic yearly (checked lazily against the [`Clock`]) and on demand. Every
//!   material version stays available for decryption; new wraps use the newest.
//! * Wrapping: AES-256-GCM under the key's material, with the encryption context (and the key
//!   id and material version) as AAD, and a random 96-bit nonce.
//!
//! Every operation appends an audit record, success or failure.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use zeroize::Zeroizing;

use super::audit::AuditLog;
use super::clock::{Clock, DAY};
use super::store::{KeyRecord, Material, State, Store};
use super::{
    Caller, Cause, DataKey, EncryptionContext, KeyManager, KeyMetadata, KeyService, KeyState,
    KmsError, Origin,
};

/// The local account id.
pub const ACCOUNT: &str = "000000000000";
/// The local region name.
pub const REGION: &str = "local";
/// Alias of the service-managed default key.
pub const DEFAULT_ALIAS: &str = "alias/aws/nbdcrypt";
/// The local administrator principal (runs `nbdcrypt kms …`, creates volumes).
pub const ADMIN_PRINCIPAL: &str = "arn:nbdcrypt:iam::000000000000:user/admin";
/// The `kms:ViaService` value nbdcrypt's serving role presents.
pub const VIA_SERVICE: &str = "nbdcrypt.local";

/// The only key spec.
pub const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";

const BLOB_MAGIC: &[u8; 4] = b"NBK1";
const AAD_LABEL: &[u8] = b"nbdcrypt-local-kms-v1";

/// The ARN of a local key id.
pub fn arn(id: &str) -> String {
    format!("arn:nbdcrypt:kms:{REGION}:{ACCOUNT}:key/{id}")
}

/// The embedded KMS.
#[derive(Debug)]
pub struct LocalKms {
    store: Store,
    audit: AuditLog,
    clock: Clock,
    lock: Mutex<()>,
    state_dir: PathBuf,
}

impl LocalKms {
    /// The local KMS of a state directory, with the clock from the environment.
    pub fn open(state_dir: &Path) -> Self {
        Self::with_clock(state_dir, Clock::from_env())
    }

    /// The local KMS with an explicit clock (tests).
    pub fn with_clock(state_dir: &Path, clock: Clock) -> Self {
        LocalKms {
            store: Store::new(state_dir),
            audit: AuditLog::new(&crate::fsutil::StateLayout::new(state_dir).audit_log()),
            clock,
            lock: Mutex::new(()),
            state_dir: state_dir.to_owned(),
        }
    }

    /// The clock (tests move it).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Runs `f` on the loaded state (after lazy deletion and rotation), saves if asked, and
    /// audits the outcome.
    fn transact<T>(
        &self,
        operation: &'static str,
        key_for_audit: &str,
        caller: &Caller,
        volume: Option<&str>,
        f: impl FnOnce(&mut State, &Self) -> Result<(T, bool, String), KmsError>,
    ) -> Result<T, KmsError> {
        let started = std::time::Instant::now();
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let result = (|| {
            let mut state = self.store.load(operation)?;
            let housekept = self.housekeeping(&mut state);
            match f(&mut state, self) {
                Ok((value, changed, key_arn)) => {
                    if housekept || changed {
                        self.store.save(operation, &state)?;
                    }
                    Ok((value, key_arn))
                }
                Err(e) => {
                    // A completed deletion or rotation is persisted even when the call fails.
                    if housekept {
                        self.store.save(operation, &state)?;
                    }
                    Err(e)
                }
            }
        })();
        let key = match &result {
            Ok((_, arn)) => arn.clone(),
            Err(_) => key_for_audit.to_owned(),
        };
        let result = self.audit.outcome(
            self.clock.now(),
            started,
            operation,
            &key,
            &caller.principal,
            caller.purpose.as_deref(),
            volume,
            result,
        );
        result.map(|(v, _)| v)
    }

    /// Completes due deletions and due automatic rotations. Returns whether anything changed.
    fn housekeeping(&self, state: &mut State) -> bool {
        let now = self.clock.now();
        let due: Vec<String> = state
            .keys
            .values()
            .filter(|k| {
                k.state == KeyState::PendingDeletion && k.deletion_date.is_some_and(|d| now >= d)
            })
            .map(|k| k.id.clone())
            .collect();
        let mut changed = !due.is_empty();
        for id in due {
            // Dropping the record wipes its material strings (Material's Drop).
            state.keys.remove(&id);
            state.aliases.retain(|_, v| *v != id);
        }
        for k in state.keys.values_mut() {
            if k.rotation_enabled && k.state == KeyState::Enabled && k.origin == Origin::AwsKms {
                let last = k.materials.last().map_or(k.created, |m| m.created);
                if now >= last + 365 * DAY
                    && let Ok(m) = random_material()
                {
                    let version = u32::try_from(k.materials.len() + 1).unwrap_or(u32::MAX);
                    k.materials.push(Material {
                        version,
                        created: last + 365 * DAY,
                        kind: "automatic".into(),
                        hex: to_hex(&m[..]),
                    });
                    changed = true;
                }
            }
        }
        changed
    }

    /// Resolves an id, ARN, alias or alias ARN to a key id. `alias/aws/nbdcrypt` is created on
    /// first use.
    fn resolve(
        &self,
        state: &mut State,
        operation: &'static str,
        key: &str,
    ) -> Result<(String, bool), KmsError> {
        let not_found = || KmsError::NotFound {
            operation,
            key: key.to_owned(),
        };
        let name = key
            .strip_prefix(&format!("arn:nbdcrypt:kms:{REGION}:{ACCOUNT}:"))
            .unwrap_or(key);
        let id = if let Some(id) = name.strip_prefix("key/") {
            id.to_owned()
        } else if name.starts_with("alias/") {
            match state.aliases.get(name) {
                Some(id) => id.clone(),
                None if name == DEFAULT_ALIAS => {
                    let id = self.insert_key(
                        state,
                        "Default key that protects nbdcrypt volumes",
                        KeyManager::Aws,
                        Origin::AwsKms,
                    )?;
                    state.aliases.insert(DEFAULT_ALIAS.into(), id.clone());
                    return Ok((id, true));
                }
                None => return Err(not_found()),
            }
        } else {
            name.to_owned()
        };
        if state.keys.contains_key(&id) {
            Ok((id, false))
        } else {
            Err(not_found())
        }
    }

    fn insert_key(
        &self,
        state: &mut State,
        description: &str,
        manager: KeyManager,
        origin: Origin,
    ) -> Result<String, KmsError> {
        let id = new_uuid();
        let now = self.clock.now();
        let materials = if origin == Origin::AwsKms {
            vec![Material {
                version: 1,
                created: now,
                kind: "creation".into(),
                hex: to_hex(&random_material()?[..]),
            }]
        } else {
            Vec::new()
        };
        state.keys.insert(
            id.clone(),
            KeyRecord {
                id: id.clone(),
                description: description.to_owned(),
                manager,
                origin,
                state: if origin == Origin::AwsKms {
                    KeyState::Enabled
                } else {
                    KeyState::PendingImport
                },
                created: now,
                deletion_date: None,
                // AWS managed keys rotate yearly; customer keys opt in.
                rotation_enabled: manager == KeyManager::Aws,
                materials,
                policy: None,
                grants: Vec::new(),
            },
        );
        Ok(id)
    }

    /// The key if its state allows cryptographic use.
    fn usable<'s>(
        state: &'s State,
        operation: &'static str,
        id: &str,
    ) -> Result<&'s KeyRecord, KmsError> {
        let k = state.keys.get(id).ok_or_else(|| KmsError::NotFound {
            operation,
            key: arn(id),
        })?;
        match k.state {
            KeyState::Enabled => Ok(k),
            KeyState::Disabled => Err(KmsError::Disabled {
                operation,
                key: arn(id),
            }),
            other => Err(KmsError::InvalidState {
                operation,
                key: arn(id),
                state: other.to_string(),
            }),
        }
    }
}

impl KeyService for LocalKms {
    fn generate_data_key(
        &self,
        key: &str,
        bytes: usize,
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<DataKey, KmsError> {
        const OP: &str = "GenerateDataKey";
        let volume = context.volume_name();
        self.transact(OP, key, caller, volume, |state, me| {
            if !(1..=1024).contains(&bytes) {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason: format!("NumberOfBytes must be 1..=1024, got {bytes}"),
                });
            }
            let (id, created) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, context)?;
            let k = Self::usable(state, OP, &id)?;
            let mut plaintext = Zeroizing::new(vec![0u8; bytes]);
            getrandom::fill(&mut plaintext).map_err(|e| KmsError::Unavailable {
                operation: OP,
                cause: Cause::new(e),
            })?;
            let blob = Self::seal(k, context, &plaintext)?;
            let key_arn = arn(&id);
            Ok((
                DataKey {
                    plaintext,
                    blob,
                    key_arn: key_arn.clone(),
                },
                created,
                key_arn,
            ))
        })
    }

    fn decrypt(
        &self,
        key: &str,
        blob: &[u8],
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        const OP: &str = "Decrypt";
        let volume = context.volume_name();
        self.transact(OP, key, caller, volume, |state, me| {
            let (id, created) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, context)?;
            let (plain, id) = Self::open_blob(state, OP, Some(&id), blob, context)?;
            Ok((plain, created, arn(&id)))
        })
    }

    fn re_encrypt(
        &self,
        source_key: &str,
        dest_key: &str,
        blob: &[u8],
        context: &EncryptionContext,
        caller: &Caller,
    ) -> Result<(Vec<u8>, String), KmsError> {
        const OP: &str = "ReEncrypt";
        let volume = context.volume_name();
        self.transact(OP, source_key, caller, volume, |state, me| {
            let (src, c1) = me.resolve(state, OP, source_key)?;
            let (dst, c2) = me.resolve(state, OP, dest_key)?;
            Self::authorize(state, OP, "ReEncryptFrom", &src, caller, context)?;
            Self::authorize(state, OP, "ReEncryptTo", &dst, caller, context)?;
            let (plain, _) = Self::open_blob(state, OP, Some(&src), blob, context)?;
            let k = Self::usable(state, OP, &dst)?;
            let new_blob = Self::seal(k, context, &plain)?;
            let dest_arn = arn(&dst);
            Ok(((new_blob, dest_arn.clone()), c1 || c2, dest_arn))
        })
    }

    fn create_grant(
        &self,
        key: &str,
        grantee: &str,
        operations: &[&str],
        context_subset: &EncryptionContext,
        caller: &Caller,
    ) -> Result<String, KmsError> {
        self.create_grant_impl(key, grantee, operations, context_subset, caller)
    }

    fn retire_grant(&self, key: &str, grant_id: &str, caller: &Caller) -> Result<(), KmsError> {
        self.remove_grant("RetireGrant", key, grant_id, caller, false)
    }

    fn serving_principal(&self) -> Option<String> {
        Some(Caller::local_service().principal)
    }

    fn describe_key(&self, key: &str, caller: &Caller) -> Result<KeyMetadata, KmsError> {
        const OP: &str = "DescribeKey";
        self.transact(OP, key, caller, None, |state, me| {
            let (id, created) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, &EncryptionContext::default())?;
            let md = metadata(&state.keys[&id]);
            Ok((md, created, arn(&id)))
        })
    }
}

/// The public metadata of a key record.
pub fn metadata(k: &KeyRecord) -> KeyMetadata {
    KeyMetadata {
        key_id: k.id.clone(),
        arn: arn(&k.id),
        state: k.state,
        manager: k.manager,
        origin: k.origin,
        description: k.description.clone(),
        created: k.created,
        deletion_date: k.deletion_date,
        rotation_enabled: k.rotation_enabled,
    }
}

mod access;
mod admin;
mod blob;
use crate::codec::to_hex;
pub use admin::KeySpec;
use blob::{new_uuid, random_material};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_access;
