//! `nbdcrypt kms …`: administration of the embedded local KMS, and the audit log.

use std::io::Write;
use std::path::Path;

use crate::cli::KmsCommand;
use crate::kms::local::{KeySpec, LocalKms};
use crate::kms::{Caller, KeyMetadata, KmsError, Origin};

/// Errors of `kms` commands.
#[derive(Debug, thiserror::Error)]
pub enum KmsCommandError {
    /// The KMS refused.
    #[error(transparent)]
    Kms(#[from] KmsError),
    /// Output or input failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Bad input.
    #[error("{0}")]
    Input(String),
}

fn show(out: &mut impl Write, md: &KeyMetadata, json: bool) -> std::io::Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(md).unwrap_or_default()
        )
    } else {
        writeln!(
            out,
            "{}  {}  {:?}  {:?}  rotation={}  {}",
            md.key_id, md.arn, md.state, md.manager, md.rotation_enabled, md.description
        )
    }
}

/// Runs a `kms` subcommand.
pub fn run(state: &Path, cmd: KmsCommand, out: &mut impl Write) -> Result<(), KmsCommandError> {
    let kms = LocalKms::open(state);
    // Administrative commands act as the local administrator.
    let me = Caller::local_admin();
    match cmd {
        KmsCommand::CreateKey {
            description,
            alias,
            key_spec,
            origin,
            json,
        } => {
            let origin = if origin == "EXTERNAL" {
                Origin::External
            } else {
                Origin::AwsKms
            };
            let md = kms.create_key(
                &description,
                alias.as_deref(),
                &KeySpec(key_spec),
                origin,
                &me,
            )?;
            if json {
                show(out, &md, true)?;
            } else {
                writeln!(out, "{}\n{}", md.key_id, md.arn)?;
            }
        }
        KmsCommand::ListKeys { json } => {
            let keys = kms.list_keys(&me)?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&keys).unwrap_or_default()
                )?;
            } else {
                for k in &keys {
                    show(out, k, false)?;
                }
            }
        }
        KmsCommand::DescribeKey { key, json } => show(
            out,
            &crate::kms::KeyService::describe_key(&kms, &key, &me)?,
            json,
        )?,
        KmsCommand::EnableKey { key } => show(out, &kms.enable_key(&key, &me)?, false)?,
        KmsCommand::DisableKey { key } => show(out, &kms.disable_key(&key, &me)?, false)?,
        KmsCommand::ScheduleKeyDeletion {
            key,
            pending_window_in_days,
        } => {
            let md = kms.schedule_key_deletion(&key, pending_window_in_days, &me)?;
            writeln!(
                out,
                "{} is pending deletion until {}",
                md.arn,
                crate::human::utc_timestamp(md.deletion_date.unwrap_or(0))
            )?;
        }
        KmsCommand::CancelKeyDeletion { key } => {
            show(out, &kms.cancel_key_deletion(&key, &me)?, false)?
        }
        KmsCommand::EnableKeyRotation { key } => {
            show(out, &kms.enable_key_rotation(&key, &me)?, false)?
        }
        KmsCommand::RotateKeyOnDemand { key } => {
            show(out, &kms.rotate_key_on_demand(&key, &me)?, false)?
        }
        KmsCommand::ListKeyRotations { key, json } => {
            let v = kms.list_key_rotations(&key, &me)?;
            if json {
                let j: Vec<_> = v
                    .iter()
                    .map(|(version, created, kind)| serde_json::json!({"version": version, "created": created, "kind": kind}))
                    .collect();
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&j).unwrap_or_default()
                )?;
            } else {
                for (version, created, kind) in v {
                    writeln!(
                        out,
                        "{version}  {}  {kind}",
                        crate::human::utc_timestamp(created)
                    )?;
                }
            }
        }
        KmsCommand::ImportKeyMaterial { key, material_file } => {
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(&material_file)?);
            let mut material = zeroize::Zeroizing::new([0u8; 32]);
            if !crate::codec::hex_into(text.trim(), &mut material[..]) {
                return Err(KmsCommandError::Input(format!(
                    "{} must hold 64 hex digits (32 bytes of key material)",
                    material_file.display()
                )));
            }
            show(
                out,
                &kms.import_key_material(&key, &material[..], &me)?,
                false,
            )?;
        }
        KmsCommand::CreateAlias { alias, key } => {
            kms.create_alias(&alias, &key, &me)?;
            writeln!(out, "{alias} -> {key}")?;
        }
        KmsCommand::ListAliases { json } => {
            let v = kms.list_aliases(&me)?;
            if json {
                let j: Vec<_> = v
                    .iter()
                    .map(|(a, k)| serde_json::json!({"alias": a, "key_id": k}))
                    .collect();
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&j).unwrap_or_default()
                )?;
            } else {
                for (a, k) in v {
                    writeln!(out, "{a}  {k}")?;
                }
            }
        }
        KmsCommand::CreateGrant {
            key,
            grantee,
            operations,
            context_subset,
        } => {
            let mut ctx = crate::kms::EncryptionContext::default();
            for pair in context_subset {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    KmsCommandError::Input(format!("--context-subset {pair:?} must be KEY=VALUE"))
                })?;
                ctx.0.insert(k.to_owned(), v.to_owned());
            }
            let ops: Vec<&str> = operations.iter().map(String::as_str).collect();
            let id = crate::kms::KeyService::create_grant(&kms, &key, &grantee, &ops, &ctx, &me)?;
            writeln!(out, "{id}")?;
        }
        KmsCommand::ListGrants { key, json } => {
            let grants = kms.list_grants(&key, &me)?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&grants).unwrap_or_default()
                )?;
            } else {
                for g in grants {
                    writeln!(
                        out,
                        "{}  {}  {}",
                        g.grant_id,
                        g.grantee,
                        g.operations.join(",")
                    )?;
                }
            }
        }
        KmsCommand::RevokeGrant { key, grant_id } => {
            kms.revoke_grant(&key, &grant_id, &me)?;
            writeln!(out, "revoked {grant_id}")?;
        }
        KmsCommand::RetireGrant { key, grant_id } => {
            crate::kms::KeyService::retire_grant(&kms, &key, &grant_id, &me)?;
            writeln!(out, "retired {grant_id}")?;
        }
        KmsCommand::PutKeyPolicy { key, policy_file } => {
            let text = std::fs::read_to_string(&policy_file)?;
            kms.put_key_policy(&key, &text, &me)?;
            writeln!(out, "policy of {key} replaced")?;
        }
        KmsCommand::GetKeyPolicy { key } => {
            writeln!(out, "{}", kms.get_key_policy(&key, &me)?)?;
        }
        KmsCommand::Audit {
            operation,
            volume,
            failures,
            json,
        } => {
            for r in kms.audit().read_all()? {
                if operation.as_ref().is_some_and(|o| *o != r.operation)
                    || volume
                        .as_ref()
                        .is_some_and(|v| Some(v) != r.volume.as_ref())
                    || (failures && r.outcome == "success")
                {
                    continue;
                }
                if json {
                    writeln!(out, "{}", serde_json::to_string(&r).unwrap_or_default())?;
                } else {
                    writeln!(
                        out,
                        "{}  {:<20} {:<8} {}  {}{}{}",
                        crate::human::utc_timestamp(r.time),
                        r.operation,
                        r.outcome,
                        r.key,
                        r.volume.as_deref().unwrap_or("-"),
                        r.purpose
                            .as_deref()
                            .map(|p| format!("  ({p})"))
                            .unwrap_or_default(),
                        r.error_code.map(|c| format!("  {c}")).unwrap_or_default()
                    )?;
                }
            }
        }
    }
    Ok(())
}
