//! AWS KMS through `aws-sdk-kms`: the same [`KeyService`] operations, the same error type.
//!
//! Credentials and region come from the standard AWS chain (environment, profile, SSO, IMDS…);
//! `--kms-endpoint` points the client at another endpoint (a VPC endpoint, or an emulator such
//! as moto in the tests). Calls run on a private single-threaded tokio runtime, because the
//! volume layer calls the key service synchronously, before the server's runtime starts.
//!
//! Every call made by nbdcrypt is also appended to the local audit log (CloudTrail keeps AWS's
//! own record). Plaintext data keys are copied out of the SDK's response into a zeroizing
//! buffer at once; the SDK's own response buffer is not zeroized (a limitation of the SDK,
//! recorded in `docs/threat-model.md`).

use std::collections::HashMap;
use std::path::Path;

use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{
    GrantConstraints, GrantOperation, KeyManagerType, KeyState as AwsKeyState, OriginType,
};
use zeroize::Zeroizing;

mod retry;

use super::audit::AuditLog;
use super::clock::Clock;
use super::{
    Caller, Cause, DataKey, EncryptionContext, KeyManager, KeyMetadata, KeyService, KeyState,
    KmsError, Origin,
};
use std::time::Instant;

/// Settings for the AWS client.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// Endpoint override (`--kms-endpoint`).
    pub endpoint: Option<String>,
    /// Region override (`--region`).
    pub region: Option<String>,
    /// The principal ARN to grant access to customer-managed keys for serving
    /// (`NBDCRYPT_AWS_SERVICE_PRINCIPAL`); without it no grants are created and the serving
    /// credentials must be allowed by the key policy.
    pub service_principal: Option<String>,
    /// Attempts per call for transient failures (`--kms-attempts`; 0 counts as 1).
    pub attempts: u32,
}

/// AWS KMS.
pub struct AwsKms {
    client: aws_sdk_kms::Client,
    rt: tokio::runtime::Runtime,
    audit: AuditLog,
    clock: Clock,
    settings: AwsSettings,
}

impl std::fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKms")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The alias nbdcrypt uses as its service default key on AWS (AWS reserves `alias/aws/`).
pub const AWS_DEFAULT_ALIAS: &str = "alias/nbdcrypt/default";

fn map_err<E>(operation: &'static str, key: &str, e: aws_sdk_kms::error::SdkError<E>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = e.code().map(str::to_owned);
    let message = e.message().unwrap_or_default().to_owned();
    let key = key.to_owned();
    match code.as_deref() {
        Some("DisabledException") => KmsError::Disabled { operation, key },
        Some("KMSInvalidStateException") => KmsError::InvalidState {
            operation,
            key,
            state: message,
        },
        Some("NotFoundException") => KmsError::NotFound { operation, key },
        Some("InvalidCiphertextException") => KmsError::InvalidCiphertext {
            operation,
            key,
            reason: if message.is_empty() {
                "the ciphertext or its context is wrong".into()
            } else {
                message
            },
        },
        Some("IncorrectKeyException") => KmsError::IncorrectKey { operation, key },
        Some("AccessDeniedException") => KmsError::AccessDenied {
            operation,
            key,
            principal: "the calling AWS principal".into(),
            reason: message,
        },
        Some("MalformedPolicyDocumentException") => KmsError::MalformedPolicy {
            operation,
            key,
            cause: Cause::msg(message),
        },
        Some(other) => KmsError::Validation {
            operation,
            reason: format!("{other}: {message}"),
        },
        None => KmsError::Unavailable {
            operation,
            cause: Cause::context(format!("key {key}: cannot reach AWS KMS"), e),
        },
    }
}

fn context_map(c: &EncryptionContext) -> Option<HashMap<String, String>> {
    (!c.0.is_empty()).then(|| c.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

impl AwsKms {
    /// A client from the standard chain with the given overrides.
    pub fn connect(state_dir: &Path, settings: AwsSettings) -> Result<Self, KmsError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| KmsError::Unavailable {
                operation: "Connect",
                cause: Cause::context("cannot start the KMS client's runtime", e),
            })?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = &settings.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(e) = &settings.endpoint {
            loader = loader.endpoint_url(e.clone());
        }
        // Retries are ours (`call`): bounded, logged, and classified per operation. Each
        // attempt is bounded too, so an endpoint that accepts and then hangs cannot stall
        // `serve` forever.
        loader = loader
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(3))
                    .operation_attempt_timeout(std::time::Duration::from_secs(20))
                    .build(),
            );
        let conf = rt.block_on(loader.load());
        if conf.region().is_none() {
            return Err(KmsError::Unavailable {
                operation: "Connect",
                cause: Cause::msg("no AWS region: set --region or AWS_REGION"),
            });
        }
        Ok(AwsKms {
            client: aws_sdk_kms::Client::new(&conf),
            rt,
            audit: AuditLog::new(&crate::fsutil::StateLayout::new(state_dir).audit_log()),
            clock: Clock::from_env(),
            settings,
        })
    }

    fn audited<T>(
        &self,
        started: Instant,
        operation: &'static str,
        key: &str,
        volume: Option<&str>,
        r: Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        self.audited_for(started, operation, key, None, volume, r)
    }

    fn audited_for<T>(
        &self,
        started: Instant,
        operation: &'static str,
        key: &str,
        purpose: Option<&str>,
        volume: Option<&str>,
        r: Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        self.audit.outcome(
            self.clock.now(),
            started,
            operation,
            key,
            "aws:credential-chain",
            purpose,
            volume,
            r,
        )
    }

    /// Resolves `key`, creating nbdcrypt's default key and alias on first use of
    /// [`AWS_DEFAULT_ALIAS`].
    fn ensure_default(&self, key: &str) -> Result<(), KmsError> {
        if key != AWS_DEFAULT_ALIAS && key != super::local::DEFAULT_ALIAS {
            return Ok(());
        }
        let exists = self.call("DescribeKey", AWS_DEFAULT_ALIAS, true, || {
            self.client.describe_key().key_id(AWS_DEFAULT_ALIAS).send()
        });
        match exists {
            Ok(_) => Ok(()),
            Err(KmsError::NotFound { .. }) => {
                let started = Instant::now();
                // Not idempotent: a timed-out CreateKey may have created a key.
                let md = self.call("CreateKey", AWS_DEFAULT_ALIAS, false, || {
                    self.client
                        .create_key()
                        .description("nbdcrypt default key for scratch volumes")
                        .send()
                })?;
                let id = required(
                    md.key_metadata().map(|m| m.key_id().to_owned()),
                    "CreateKey",
                    AWS_DEFAULT_ALIAS,
                    "KeyMetadata",
                )?;
                let r = self.call("CreateAlias", AWS_DEFAULT_ALIAS, false, || {
                    self.client
                        .create_alias()
                        .alias_name(AWS_DEFAULT_ALIAS)
                        .target_key_id(&id)
                        .send()
                });
                self.audited(started, "CreateKey", &id, None, r.map(|_| ()))
            }
            Err(e) => Err(e),
        }
    }

    fn key_name(key: &str) -> &str {
        if key == super::local::DEFAULT_ALIAS {
            AWS_DEFAULT_ALIAS
        } else {
            key
        }
    }
}

impl KeyService for AwsKms {
    fn generate_data_key(
        &self,
        key: &str,
        bytes: usize,
        context: &EncryptionContext,
        _caller: &Caller,
    ) -> Result<DataKey, KmsError> {
        const OP: &str = "GenerateDataKey";
        let volume = context.volume_name();
        let started = Instant::now();
        let r = (|| {
            self.ensure_default(key)?;
            let key = Self::key_name(key);
            let n = i32::try_from(bytes).map_err(|_| KmsError::Validation {
                operation: OP,
                reason: "too many bytes".into(),
            })?;
            let out = self.call(OP, key, true, || {
                self.client
                    .generate_data_key()
                    .key_id(key)
                    .number_of_bytes(n)
                    .set_encryption_context(context_map(context))
                    .send()
            })?;
            let plaintext = Zeroizing::new(
                out.plaintext()
                    .map(|b| b.as_ref().to_vec())
                    .unwrap_or_default(),
            );
            if plaintext.len() != bytes {
                return Err(KmsError::InvalidCiphertext {
                    operation: OP,
                    key: key.into(),
                    reason: format!("KMS returned {} bytes instead of {bytes}", plaintext.len()),
                });
            }
            Ok(DataKey {
                plaintext,
                blob: required(
                    out.ciphertext_blob().map(|b| b.as_ref().to_vec()),
                    OP,
                    key,
                    "CiphertextBlob",
                )?,
                key_arn: required(out.key_id(), OP, key, "KeyId")?.to_owned(),
            })
        })();
        self.audited(started, OP, key, volume, r)
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
        let started = Instant::now();
        let r = self
            .call(OP, key, true, || {
                self.client
                    .decrypt()
                    .key_id(Self::key_name(key))
                    .ciphertext_blob(Blob::new(blob.to_vec()))
                    .set_encryption_context(context_map(context))
                    .send()
            })
            .and_then(|out| {
                required(
                    out.plaintext().map(|b| Zeroizing::new(b.as_ref().to_vec())),
                    OP,
                    key,
                    "Plaintext",
                )
            });
        self.audited_for(started, OP, key, caller.purpose.as_deref(), volume, r)
    }

    fn re_encrypt(
        &self,
        source_key: &str,
        dest_key: &str,
        blob: &[u8],
        context: &EncryptionContext,
        _caller: &Caller,
    ) -> Result<(Vec<u8>, String), KmsError> {
        const OP: &str = "ReEncrypt";
        let volume = context.volume_name();
        let started = Instant::now();
        let r = self
            .call(OP, source_key, true, || {
                self.client
                    .re_encrypt()
                    .source_key_id(Self::key_name(source_key))
                    .destination_key_id(Self::key_name(dest_key))
                    .ciphertext_blob(Blob::new(blob.to_vec()))
                    .set_source_encryption_context(context_map(context))
                    .set_destination_encryption_context(context_map(context))
                    .send()
            })
            .and_then(|out| {
                Ok((
                    required(
                        out.ciphertext_blob().map(|b| b.as_ref().to_vec()),
                        OP,
                        dest_key,
                        "CiphertextBlob",
                    )?,
                    required(out.key_id(), OP, dest_key, "KeyId")?.to_owned(),
                ))
            });
        self.audited(started, OP, source_key, volume, r)
    }

    fn describe_key(&self, key: &str, _caller: &Caller) -> Result<KeyMetadata, KmsError> {
        const OP: &str = "DescribeKey";
        let started = Instant::now();
        let r = (|| {
            self.ensure_default(key)?;
            let key = Self::key_name(key);
            let out = self.call(OP, key, true, || {
                self.client.describe_key().key_id(key).send()
            })?;
            let m = out.key_metadata().ok_or_else(|| KmsError::NotFound {
                operation: OP,
                key: key.into(),
            })?;
            Ok(KeyMetadata {
                key_id: m.key_id().to_owned(),
                arn: m.arn().unwrap_or(m.key_id()).to_owned(),
                state: match m.key_state() {
                    Some(AwsKeyState::Enabled) => KeyState::Enabled,
                    Some(AwsKeyState::PendingDeletion) => KeyState::PendingDeletion,
                    Some(AwsKeyState::PendingImport) => KeyState::PendingImport,
                    _ => KeyState::Disabled,
                },
                manager: if m.key_manager() == Some(&KeyManagerType::Aws) {
                    KeyManager::Aws
                } else {
                    KeyManager::Customer
                },
                origin: if m.origin() == Some(&OriginType::External) {
                    Origin::External
                } else {
                    Origin::AwsKms
                },
                description: m.description().unwrap_or_default().to_owned(),
                created: m
                    .creation_date()
                    .map_or(0, |d| u64::try_from(d.secs()).unwrap_or(0)),
                deletion_date: m
                    .deletion_date()
                    .map(|d| u64::try_from(d.secs()).unwrap_or(0)),
                rotation_enabled: false,
            })
        })();
        self.audited(started, OP, key, None, r)
    }

    fn create_grant(
        &self,
        key: &str,
        grantee: &str,
        operations: &[&str],
        context_subset: &EncryptionContext,
        _caller: &Caller,
    ) -> Result<String, KmsError> {
        const OP: &str = "CreateGrant";
        let ops: Vec<GrantOperation> = operations
            .iter()
            .map(|o| GrantOperation::from(*o))
            .collect();
        let constraints = GrantConstraints::builder()
            .set_encryption_context_subset(context_map(context_subset))
            .build();
        let started = Instant::now();
        let r = self
            .call(OP, key, false, || {
                self.client
                    .create_grant()
                    .key_id(Self::key_name(key))
                    .grantee_principal(grantee)
                    .set_operations(Some(ops.clone()))
                    .constraints(constraints.clone())
                    .send()
            })
            .and_then(|out| Ok(required(out.grant_id(), OP, key, "GrantId")?.to_owned()));
        self.audited(started, OP, key, None, r)
    }

    fn retire_grant(&self, key: &str, grant_id: &str, _caller: &Caller) -> Result<(), KmsError> {
        const OP: &str = "RetireGrant";
        let started = Instant::now();
        let r = self
            .call(OP, key, true, || {
                self.client
                    .retire_grant()
                    .key_id(Self::key_name(key))
                    .grant_id(grant_id)
                    .send()
            })
            .map(|_| ());
        self.audited(started, OP, key, None, r)
    }

    fn serving_principal(&self) -> Option<String> {
        self.settings.service_principal.clone()
    }
}

/// A field the operation must return; its absence is an error naming the operation, never an
/// empty value that could be written into a header.
fn required<T>(
    value: Option<T>,
    operation: &'static str,
    key: &str,
    field: &'static str,
) -> Result<T, KmsError> {
    value.ok_or_else(|| KmsError::MalformedResponse {
        operation,
        key: key.to_owned(),
        field,
    })
}
