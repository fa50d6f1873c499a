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

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use super::audit::AuditLog;
use super::clock::{Clock, DAY};
use super::store::{KeyRecord, Material, State, Store};
use super::{
    Caller, DataKey, EncryptionContext, KeyManager, KeyMetadata, KeyService, KeyState, KmsError,
    Origin,
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

fn new_uuid() -> String {
    let mut b = [0u8; 16];
    // getrandom failing leaves zeros; the uniqueness check in create_key catches a collision.
    let _ = getrandom::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn random_material() -> Result<Zeroizing<Vec<u8>>, KmsError> {
    let mut m = Zeroizing::new(vec![0u8; 32]);
    getrandom::fill(&mut m).map_err(|e| KmsError::Unavailable {
        operation: "GenerateRandom",
        reason: e.to_string(),
    })?;
    Ok(m)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Zeroizing<Vec<u8>>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(s.len() / 2));
    for i in (0..s.len()).step_by(2) {
        out.push(u8::from_str_radix(s.get(i..i + 2)?, 16).ok()?);
    }
    Some(out)
}

fn aad(key_id: &str, version: u32, context: &EncryptionContext) -> Vec<u8> {
    let mut a = AAD_LABEL.to_vec();
    a.extend_from_slice(key_id.as_bytes());
    a.extend_from_slice(&version.to_be_bytes());
    a.extend_from_slice(&context.canonical());
    a
}

/// A parsed local blob.
struct Blob<'a> {
    key_id: String,
    version: u32,
    nonce: [u8; 12],
    sealed: &'a [u8],
}

fn parse_blob(blob: &[u8]) -> Option<Blob<'_>> {
    if blob.len() < 4 + 16 + 4 + 12 + 16 || &blob[..4] != BLOB_MAGIC {
        return None;
    }
    let id = &blob[4..20];
    let h = hex(id);
    let key_id = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    );
    let version = u32::from_be_bytes(blob[20..24].try_into().ok()?);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&blob[24..36]);
    Some(Blob {
        key_id,
        version,
        nonce,
        sealed: &blob[36..],
    })
}

fn uuid_bytes(id: &str) -> Option<[u8; 16]> {
    let raw: String = id.chars().filter(|c| *c != '-').collect();
    let v = unhex(&raw)?;
    v.as_slice().try_into().ok()
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
            audit: AuditLog::new(&state_dir.join("audit.log")),
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
            operation,
            &key,
            &caller.principal,
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
                        hex: hex(&m),
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
                hex: hex(&random_material()?),
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

    /// Decides whether `caller` may perform `action` on key `id` (explicit Deny, then policy
    /// Allow, then grants), as AWS does. `context` is the request's encryption context.
    fn authorize(
        state: &State,
        operation: &'static str,
        action: &str,
        id: &str,
        caller: &Caller,
        context: &EncryptionContext,
    ) -> Result<(), KmsError> {
        let k = state.keys.get(id).ok_or_else(|| KmsError::NotFound {
            operation,
            key: arn(id),
        })?;
        let text = k.policy.clone().unwrap_or_else(|| match k.manager {
            KeyManager::Aws => super::policy::default_managed_policy(ACCOUNT, VIA_SERVICE),
            KeyManager::Customer => {
                super::policy::default_customer_policy(ACCOUNT, ADMIN_PRINCIPAL)
            }
        });
        let policy = super::policy::parse(&text).map_err(|reason| KmsError::MalformedPolicy {
            operation,
            key: arn(id),
            reason,
        })?;
        let key_arn = arn(id);
        let facts = super::policy::RequestFacts {
            principal: &caller.principal,
            account: &caller.account,
            via_service: caller.via_service.as_deref(),
            action,
            resource: &key_arn,
            context: &context.0,
        };
        let denied = |reason: String| KmsError::AccessDenied {
            operation,
            key: key_arn.clone(),
            principal: caller.principal.clone(),
            reason,
        };
        match policy.evaluate(&facts) {
            super::policy::Decision::Allow => Ok(()),
            super::policy::Decision::ExplicitDeny(sid) => Err(denied(format!(
                "of an explicit deny in the key policy{}",
                sid.map(|s| format!(" (statement {s:?})"))
                    .unwrap_or_default()
            ))),
            super::policy::Decision::ImplicitDeny => {
                let granted = k.grants.iter().any(|g| {
                    g.grantee == caller.principal
                        && g.operations.iter().any(|o| o == action)
                        && g.context_subset
                            .iter()
                            .all(|(ck, cv)| context.0.get(ck) == Some(cv))
                        && (g.context_equals.is_empty() || g.context_equals == context.0)
                });
                if granted {
                    Ok(())
                } else {
                    Err(denied(format!(
                        "no key policy statement or grant allows the kms:{action} action"
                    )))
                }
            }
        }
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

    fn seal(
        k: &KeyRecord,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KmsError> {
        let m = k.materials.last().ok_or_else(|| KmsError::InvalidState {
            operation: "Encrypt",
            key: arn(&k.id),
            state: "without key material".into(),
        })?;
        let material = unhex(&m.hex).ok_or_else(|| KmsError::Unavailable {
            operation: "Encrypt",
            reason: "stored key material is malformed".into(),
        })?;
        let cipher = Aes256Gcm::new_from_slice(&material).map_err(|_| KmsError::Unavailable {
            operation: "Encrypt",
            reason: "stored key material has the wrong length".into(),
        })?;
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| KmsError::Unavailable {
            operation: "Encrypt",
            reason: e.to_string(),
        })?;
        let mut sealed = plaintext.to_vec();
        let tag = cipher
            .encrypt_inout_detached(
                &Nonce::from(nonce),
                &aad(&k.id, m.version, context),
                sealed.as_mut_slice().into(),
            )
            .map_err(|_| KmsError::Unavailable {
                operation: "Encrypt",
                reason: "AES-GCM refused the input".into(),
            })?;
        let mut blob = BLOB_MAGIC.to_vec();
        blob.extend_from_slice(&uuid_bytes(&k.id).unwrap_or([0; 16]));
        blob.extend_from_slice(&m.version.to_be_bytes());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        blob.extend_from_slice(&tag);
        Ok(blob)
    }

    fn open_blob(
        state: &State,
        operation: &'static str,
        named: Option<&str>,
        blob: &[u8],
        context: &EncryptionContext,
    ) -> Result<(Zeroizing<Vec<u8>>, String), KmsError> {
        let b = parse_blob(blob).ok_or_else(|| KmsError::InvalidCiphertext {
            operation,
            key: named.map_or_else(|| "(unknown)".into(), arn),
            reason: "the ciphertext blob is not a local KMS blob or is truncated".into(),
        })?;
        if let Some(n) = named
            && n != b.key_id
        {
            return Err(KmsError::IncorrectKey {
                operation,
                key: arn(n),
            });
        }
        let k = Self::usable(state, operation, &b.key_id)?;
        let m = k
            .materials
            .iter()
            .find(|m| m.version == b.version)
            .ok_or_else(|| KmsError::InvalidCiphertext {
                operation,
                key: arn(&k.id),
                reason: format!("key material version {} does not exist", b.version),
            })?;
        let material = unhex(&m.hex).ok_or_else(|| KmsError::Unavailable {
            operation,
            reason: "stored key material is malformed".into(),
        })?;
        let cipher = Aes256Gcm::new_from_slice(&material).map_err(|_| KmsError::Unavailable {
            operation,
            reason: "stored key material has the wrong length".into(),
        })?;
        if b.sealed.len() < 16 {
            return Err(KmsError::InvalidCiphertext {
                operation,
                key: arn(&k.id),
                reason: "truncated".into(),
            });
        }
        let (body, tag) = b.sealed.split_at(b.sealed.len() - 16);
        let mut plain = Zeroizing::new(body.to_vec());
        let tag: [u8; 16] = tag.try_into().unwrap_or([0; 16]);
        cipher
            .decrypt_inout_detached(
                &Nonce::from(b.nonce),
                &aad(&k.id, b.version, context),
                plain.as_mut_slice().into(),
                &tag.into(),
            )
            .map_err(|_| KmsError::InvalidCiphertext {
                operation,
                key: arn(&k.id),
                reason: "the ciphertext is damaged or the encryption context does not match".into(),
            })?;
        Ok((plain, k.id.clone()))
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
        let volume = context.0.get("nbdcrypt:volume").cloned();
        self.transact(OP, key, caller, volume.as_deref(), |state, me| {
            if !(1..=1024).contains(&bytes) {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason: format!("NumberOfBytes must be 1..=1024, got {bytes}"),
                });
            }
            let (id, created) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, context)?;
            let k = Self::usable(state, OP, &id)?;
            let plaintext = random_material().and_then(|_| {
                let mut p = Zeroizing::new(vec![0u8; bytes]);
                getrandom::fill(&mut p).map_err(|e| KmsError::Unavailable {
                    operation: OP,
                    reason: e.to_string(),
                })?;
                Ok(p)
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
        let volume = context.0.get("nbdcrypt:volume").cloned();
        self.transact(OP, key, caller, volume.as_deref(), |state, me| {
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
        let volume = context.0.get("nbdcrypt:volume").cloned();
        self.transact(OP, source_key, caller, volume.as_deref(), |state, me| {
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

impl LocalKms {
    fn create_grant_impl(
        &self,
        key: &str,
        grantee: &str,
        operations: &[&str],
        context_subset: &EncryptionContext,
        caller: &Caller,
    ) -> Result<String, KmsError> {
        const OP: &str = "CreateGrant";
        const GRANTABLE: [&str; 7] = [
            "Decrypt",
            "Encrypt",
            "GenerateDataKey",
            "ReEncryptFrom",
            "ReEncryptTo",
            "DescribeKey",
            "RetireGrant",
        ];
        self.transact(OP, key, caller, None, |state, me| {
            let (id, c) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, &EncryptionContext::default())?;
            if let Some(bad) = operations.iter().find(|o| !GRANTABLE.contains(o)) {
                return Err(KmsError::Validation {
                    operation: OP,
                    reason: format!("{bad} is not a grant operation"),
                });
            }
            let k = state.keys.get_mut(&id).ok_or_else(|| KmsError::NotFound {
                operation: OP,
                key: key.to_owned(),
            })?;
            if matches!(k.state, KeyState::PendingDeletion) {
                return Err(KmsError::InvalidState {
                    operation: OP,
                    key: arn(&id),
                    state: k.state.to_string(),
                });
            }
            let grant_id = new_uuid().replace('-', "");
            k.grants.push(super::store::Grant {
                grant_id: grant_id.clone(),
                name: String::new(),
                grantee: grantee.to_owned(),
                retiring_principal: Some(caller.principal.clone()),
                operations: operations.iter().map(|o| (*o).to_owned()).collect(),
                context_subset: context_subset.0.clone(),
                context_equals: Default::default(),
                created: me.clock.now(),
            });
            let _ = c;
            Ok((grant_id, true, arn(&id)))
        })
    }

    fn remove_grant(
        &self,
        operation: &'static str,
        key: &str,
        grant_id: &str,
        caller: &Caller,
        revoke: bool,
    ) -> Result<(), KmsError> {
        self.transact(operation, key, caller, None, |state, me| {
            let (id, _) = me.resolve(state, operation, key)?;
            let k = state.keys.get(&id).ok_or_else(|| KmsError::NotFound {
                operation,
                key: key.to_owned(),
            })?;
            let g = k
                .grants
                .iter()
                .find(|g| g.grant_id == grant_id)
                .cloned()
                .ok_or_else(|| KmsError::NotFound {
                    operation,
                    key: format!("{} grant {grant_id}", arn(&id)),
                })?;
            let retiring = !revoke
                && (g.grantee == caller.principal
                    || g.retiring_principal.as_deref() == Some(caller.principal.as_str()));
            if !retiring {
                Self::authorize(
                    state,
                    operation,
                    operation,
                    &id,
                    caller,
                    &EncryptionContext::default(),
                )?;
            }
            if let Some(k) = state.keys.get_mut(&id) {
                k.grants.retain(|x| x.grant_id != grant_id);
            }
            Ok(((), true, arn(&id)))
        })
    }

    /// `RevokeGrant` (key administrators).
    pub fn revoke_grant(&self, key: &str, grant_id: &str, caller: &Caller) -> Result<(), KmsError> {
        self.remove_grant("RevokeGrant", key, grant_id, caller, true)
    }

    /// `ListGrants`.
    pub fn list_grants(
        &self,
        key: &str,
        caller: &Caller,
    ) -> Result<Vec<super::store::Grant>, KmsError> {
        const OP: &str = "ListGrants";
        self.transact(OP, key, caller, None, |state, me| {
            let (id, _) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, &EncryptionContext::default())?;
            Ok((state.keys[&id].grants.clone(), false, arn(&id)))
        })
    }

    /// `PutKeyPolicy`: refuses documents it does not fully understand.
    pub fn put_key_policy(&self, key: &str, policy: &str, caller: &Caller) -> Result<(), KmsError> {
        const OP: &str = "PutKeyPolicy";
        self.transact(OP, key, caller, None, |state, me| {
            let (id, _) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, &EncryptionContext::default())?;
            super::policy::parse(policy).map_err(|reason| KmsError::MalformedPolicy {
                operation: OP,
                key: arn(&id),
                reason,
            })?;
            let k = state.keys.get_mut(&id).ok_or_else(|| KmsError::NotFound {
                operation: OP,
                key: key.to_owned(),
            })?;
            if k.manager == KeyManager::Aws {
                return Err(KmsError::AccessDenied {
                    operation: OP,
                    key: arn(&id),
                    principal: caller.principal.clone(),
                    reason: "the key is AWS managed and its policy cannot be changed".into(),
                });
            }
            k.policy = Some(policy.to_owned());
            Ok(((), true, arn(&id)))
        })
    }

    /// `GetKeyPolicy` (the default policy when none was put).
    pub fn get_key_policy(&self, key: &str, caller: &Caller) -> Result<String, KmsError> {
        const OP: &str = "GetKeyPolicy";
        self.transact(OP, key, caller, None, |state, me| {
            let (id, _) = me.resolve(state, OP, key)?;
            Self::authorize(state, OP, OP, &id, caller, &EncryptionContext::default())?;
            let k = &state.keys[&id];
            let p = k.policy.clone().unwrap_or_else(|| match k.manager {
                KeyManager::Aws => super::policy::default_managed_policy(ACCOUNT, VIA_SERVICE),
                KeyManager::Customer => {
                    super::policy::default_customer_policy(ACCOUNT, ADMIN_PRINCIPAL)
                }
            });
            Ok((p, false, arn(&id)))
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

mod admin;
pub use admin::KeySpec;

#[cfg(test)]
mod tests;
