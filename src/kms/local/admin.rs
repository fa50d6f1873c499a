//! Key administration on the local KMS: the `nbdcrypt kms …` operations.

use super::super::store::Material;
use super::super::{Caller, KeyManager, KeyMetadata, KeyState, KmsError, Origin};
use super::{DAY, LocalKms, arn, metadata, random_material};
use crate::codec::to_hex;

/// Key specs a caller may ask for; only `SYMMETRIC_DEFAULT` is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec(pub String);

impl Default for KeySpec {
    fn default() -> Self {
        KeySpec(super::SYMMETRIC_DEFAULT.into())
    }
}

fn state_error(operation: &'static str, id: &str, state: KeyState) -> KmsError {
    KmsError::InvalidState {
        operation,
        key: arn(id),
        state: state.to_string(),
    }
}

impl LocalKms {
    /// `CreateKey`: a customer-managed symmetric key, optionally with an alias.
    pub fn create_key(
        &self,
        description: &str,
        alias: Option<&str>,
        spec: &KeySpec,
        origin: Origin,
        caller: &Caller,
    ) -> Result<KeyMetadata, KmsError> {
        const OP: &str = "CreateKey";
        self.transact(OP, alias.unwrap_or("(new key)"), caller, None, |state, me| {
            if spec.0 != super::SYMMETRIC_DEFAULT {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason: format!(
                        "key spec {} is not supported: nbdcrypt wraps volume keys with symmetric keys only (SYMMETRIC_DEFAULT)",
                        spec.0
                    ),
                });
            }
            if let Some(a) = alias {
                check_alias(OP, a)?;
                if state.aliases.contains_key(a) {
                    return Err(KmsError::Validation {
                        operation: OP,
                        reason: format!("alias {a} already exists"),
                    });
                }
            }
            let id = me.insert_key(state, description, KeyManager::Customer, origin)?;
            if let Some(a) = alias {
                state.aliases.insert(a.to_owned(), id.clone());
            }
            Ok((metadata(&state.keys[&id]), true, arn(&id)))
        })
    }

    /// `ListKeys` (with metadata).
    pub fn list_keys(&self, caller: &Caller) -> Result<Vec<KeyMetadata>, KmsError> {
        self.transact("ListKeys", "*", caller, None, |state, _| {
            Ok((
                state.keys.values().map(metadata).collect(),
                false,
                "*".into(),
            ))
        })
    }

    /// `ListAliases`: `(alias, key id)`.
    pub fn list_aliases(&self, caller: &Caller) -> Result<Vec<(String, String)>, KmsError> {
        self.transact("ListAliases", "*", caller, None, |state, _| {
            Ok((
                state
                    .aliases
                    .iter()
                    .map(|(a, k)| (a.clone(), k.clone()))
                    .collect(),
                false,
                "*".into(),
            ))
        })
    }

    /// `CreateAlias`.
    pub fn create_alias(&self, alias: &str, key: &str, caller: &Caller) -> Result<(), KmsError> {
        const OP: &str = "CreateAlias";
        self.transact(OP, key, caller, None, |state, me| {
            check_alias(OP, alias)?;
            let (id, _) = me.resolve(state, OP, key)?;
            if state.aliases.contains_key(alias) {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason: format!("alias {alias} already exists"),
                });
            }
            state.aliases.insert(alias.to_owned(), id.clone());
            Ok(((), true, arn(&id)))
        })
    }

    fn customer_key_op(
        &self,
        operation: &'static str,
        key: &str,
        caller: &Caller,
        f: impl FnOnce(&mut super::super::store::KeyRecord, u64) -> Result<(), KmsError>,
    ) -> Result<KeyMetadata, KmsError> {
        self.transact(operation, key, caller, None, |state, me| {
            let (id, _) = me.resolve(state, operation, key)?;
            let now = me.clock.now();
            if state
                .keys
                .get(&id)
                .is_some_and(|k| k.manager == KeyManager::Customer)
            {
                Self::authorize(
                    state,
                    operation,
                    operation,
                    &id,
                    caller,
                    &Default::default(),
                )?;
            }
            let k = state.keys.get_mut(&id).ok_or_else(|| KmsError::NotFound {
                operation,
                key: key.to_owned(),
            })?;
            if k.manager == KeyManager::Aws {
                return Err(KmsError::AccessDenied {
                    operation,
                    key: arn(&id),
                    principal: caller.principal.clone(),
                    reason: "the key is AWS managed and cannot be changed by customers".into(),
                });
            }
            f(k, now)?;
            Ok((metadata(k), true, arn(&id)))
        })
    }

    /// `EnableKey`.
    pub fn enable_key(&self, key: &str, caller: &Caller) -> Result<KeyMetadata, KmsError> {
        self.customer_key_op("EnableKey", key, caller, |k, _| match k.state {
            KeyState::Enabled | KeyState::Disabled => {
                k.state = KeyState::Enabled;
                Ok(())
            }
            s => Err(state_error("EnableKey", &k.id, s)),
        })
    }

    /// `DisableKey`.
    pub fn disable_key(&self, key: &str, caller: &Caller) -> Result<KeyMetadata, KmsError> {
        self.customer_key_op("DisableKey", key, caller, |k, _| match k.state {
            KeyState::Enabled | KeyState::Disabled => {
                k.state = KeyState::Disabled;
                Ok(())
            }
            s => Err(state_error("DisableKey", &k.id, s)),
        })
    }

    /// `ScheduleKeyDeletion` with a 7–30 day window.
    pub fn schedule_key_deletion(
        &self,
        key: &str,
        days: u64,
        caller: &Caller,
    ) -> Result<KeyMetadata, KmsError> {
        const OP: &str = "ScheduleKeyDeletion";
        self.customer_key_op(OP, key, caller, |k, now| {
            if !(7..=30).contains(&days) {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason: format!("PendingWindowInDays must be 7..=30, got {days}"),
                });
            }
            if k.state == KeyState::PendingDeletion {
                return Err(state_error(OP, &k.id, k.state));
            }
            k.state = KeyState::PendingDeletion;
            k.deletion_date = Some(now + days * DAY);
            Ok(())
        })
    }

    /// `CancelKeyDeletion`: the key returns to Disabled, as in AWS.
    pub fn cancel_key_deletion(&self, key: &str, caller: &Caller) -> Result<KeyMetadata, KmsError> {
        const OP: &str = "CancelKeyDeletion";
        self.customer_key_op(OP, key, caller, |k, _| {
            if k.state != KeyState::PendingDeletion {
                return Err(state_error(OP, &k.id, k.state));
            }
            k.state = KeyState::Disabled;
            k.deletion_date = None;
            Ok(())
        })
    }

    /// `EnableKeyRotation` (yearly). Not for imported material.
    pub fn enable_key_rotation(&self, key: &str, caller: &Caller) -> Result<KeyMetadata, KmsError> {
        const OP: &str = "EnableKeyRotation";
        self.customer_key_op(OP, key, caller, |k, _| {
            if k.origin == Origin::External {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason:
                        "keys with imported material (EXTERNAL origin) do not rotate automatically"
                            .into(),
                });
            }
            if k.state != KeyState::Enabled {
                return Err(state_error(OP, &k.id, k.state));
            }
            k.rotation_enabled = true;
            Ok(())
        })
    }

    /// `RotateKeyOnDemand`: new material now; old versions stay for decryption.
    pub fn rotate_key_on_demand(
        &self,
        key: &str,
        caller: &Caller,
    ) -> Result<KeyMetadata, KmsError> {
        const OP: &str = "RotateKeyOnDemand";
        self.customer_key_op(OP, key, caller, |k, now| {
            if k.origin == Origin::External {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason: "keys with imported material cannot be rotated on demand".into(),
                });
            }
            if k.state != KeyState::Enabled {
                return Err(state_error(OP, &k.id, k.state));
            }
            let version = u32::try_from(k.materials.len() + 1).unwrap_or(u32::MAX);
            k.materials.push(Material {
                version,
                created: now,
                kind: "on-demand".into(),
                hex: to_hex(&random_material()?[..]),
            });
            Ok(())
        })
    }

    /// `ListKeyRotations`: `(version, created, kind)` of every material version.
    pub fn list_key_rotations(
        &self,
        key: &str,
        caller: &Caller,
    ) -> Result<Vec<(u32, u64, String)>, KmsError> {
        const OP: &str = "ListKeyRotations";
        self.transact(OP, key, caller, None, |state, me| {
            let (id, c) = me.resolve(state, OP, key)?;
            let v = state.keys[&id]
                .materials
                .iter()
                .map(|m| (m.version, m.created, m.kind.clone()))
                .collect();
            Ok((v, c, arn(&id)))
        })
    }

    /// `ImportKeyMaterial`: 32 bytes for an EXTERNAL-origin key, which becomes Enabled.
    pub fn import_key_material(
        &self,
        key: &str,
        material: &[u8],
        caller: &Caller,
    ) -> Result<KeyMetadata, KmsError> {
        const OP: &str = "ImportKeyMaterial";
        self.customer_key_op(OP, key, caller, |k, now| {
            if k.origin != Origin::External {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason: "only keys created with origin EXTERNAL accept imported material"
                        .into(),
                });
            }
            if material.len() != 32 {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason: format!("imported material must be 32 bytes, got {}", material.len()),
                });
            }
            if !k.materials.is_empty() {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason: "this key already has imported material".into(),
                });
            }
            k.materials.push(Material {
                version: 1,
                created: now,
                kind: "import".into(),
                hex: to_hex(material),
            });
            k.state = KeyState::Enabled;
            Ok(())
        })
    }
}

fn check_alias(operation: &'static str, alias: &str) -> Result<(), KmsError> {
    let ok = alias.strip_prefix("alias/").is_some_and(|n| {
        !n.is_empty()
            && !n.starts_with("aws/")
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c))
    });
    if ok {
        Ok(())
    } else {
        Err(KmsError::Validation {
            operation,
            reason: format!(
                "alias {alias:?} must look like alias/NAME and must not use the reserved alias/aws/ prefix"
            ),
        })
    }
}
