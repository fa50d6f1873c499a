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
    /// JSON output could not be encoded (reported, never printed as an empty string).
    #[error("cannot encode the JSON output: {0}")]
    Json(#[from] serde_json::Error),
    /// Bad input.
    #[error("{0}")]
    Input(String),
}

type Out<'a> = &'a mut dyn Write;

/// One JSON document per line (`compact`) or pretty-printed.
fn json(out: Out<'_>, v: &impl serde::Serialize, compact: bool) -> Result<(), KmsCommandError> {
    let text = if compact {
        serde_json::to_string(v)?
    } else {
        serde_json::to_string_pretty(v)?
    };
    writeln!(out, "{text}")?;
    Ok(())
}

fn show(out: Out<'_>, md: &KeyMetadata, as_json: bool) -> Result<(), KmsCommandError> {
    if as_json {
        return json(out, md, false);
    }
    writeln!(
        out,
        "{}  {}  {:?}  {:?}  rotation={}  {}",
        md.key_id, md.arn, md.state, md.manager, md.rotation_enabled, md.description
    )?;
    Ok(())
}

/// Runs a `kms` subcommand: one handler per command (or per group of commands that only
/// change a key's state and show it).
pub fn run(state: &Path, cmd: KmsCommand, out: &mut impl Write) -> Result<(), KmsCommandError> {
    let kms = LocalKms::open(state);
    // Administrative commands act as the local administrator.
    let me = Caller::local_admin();
    let out: Out<'_> = out;
    match cmd {
        KmsCommand::CreateKey {
            description,
            alias,
            key_spec,
            origin,
            json,
        } => create_key(
            &kms,
            &me,
            out,
            &description,
            alias.as_deref(),
            key_spec,
            origin,
            json,
        ),
        KmsCommand::ListKeys { json: as_json } => {
            let keys = kms.list_keys(&me)?;
            if as_json {
                return json(out, &keys, false);
            }
            keys.iter().try_for_each(|k| show(out, k, false))
        }
        KmsCommand::DescribeKey { key, json } => show(
            out,
            &crate::kms::KeyService::describe_key(&kms, &key, &me)?,
            json,
        ),
        KmsCommand::ListKeyRotations { key, json } => {
            list_key_rotations(&kms, &me, out, &key, json)
        }
        KmsCommand::ImportKeyMaterial { key, material_file } => {
            import_key_material(&kms, &me, out, &key, &material_file)
        }
        KmsCommand::CreateAlias { alias, key } => {
            kms.create_alias(&alias, &key, &me)?;
            writeln!(out, "{alias} -> {key}")?;
            Ok(())
        }
        KmsCommand::ListAliases { json } => list_aliases(&kms, &me, out, json),
        KmsCommand::CreateGrant {
            key,
            grantee,
            operations,
            context_subset,
        } => create_grant(&kms, &me, out, &key, &grantee, &operations, &context_subset),
        KmsCommand::ListGrants { key, json } => list_grants(&kms, &me, out, &key, json),
        KmsCommand::RevokeGrant { key, grant_id } => {
            kms.revoke_grant(&key, &grant_id, &me)?;
            writeln!(out, "revoked {grant_id}")?;
            Ok(())
        }
        KmsCommand::RetireGrant { key, grant_id } => {
            crate::kms::KeyService::retire_grant(&kms, &key, &grant_id, &me)?;
            writeln!(out, "retired {grant_id}")?;
            Ok(())
        }
        KmsCommand::PutKeyPolicy { key, policy_file } => {
            let text = std::fs::read_to_string(&policy_file)?;
            kms.put_key_policy(&key, &text, &me)?;
            writeln!(out, "policy of {key} replaced")?;
            Ok(())
        }
        KmsCommand::GetKeyPolicy { key } => {
            writeln!(out, "{}", kms.get_key_policy(&key, &me)?)?;
            Ok(())
        }
        KmsCommand::Audit {
            operation,
            volume,
            failures,
            json,
        } => audit(
            &kms,
            out,
            operation.as_deref(),
            volume.as_deref(),
            failures,
            json,
        ),
        state_change => key_state(&kms, &me, out, state_change),
    }
}

/// Commands that change a key's state or rotation and show the key after.
fn key_state(
    kms: &LocalKms,
    me: &Caller,
    out: Out<'_>,
    cmd: KmsCommand,
) -> Result<(), KmsCommandError> {
    let md = match cmd {
        KmsCommand::EnableKey { key } => kms.enable_key(&key, me)?,
        KmsCommand::DisableKey { key } => kms.disable_key(&key, me)?,
        KmsCommand::CancelKeyDeletion { key } => kms.cancel_key_deletion(&key, me)?,
        KmsCommand::EnableKeyRotation { key } => kms.enable_key_rotation(&key, me)?,
        KmsCommand::RotateKeyOnDemand { key } => kms.rotate_key_on_demand(&key, me)?,
        KmsCommand::ScheduleKeyDeletion {
            key,
            pending_window_in_days,
        } => {
            let md = kms.schedule_key_deletion(&key, pending_window_in_days, me)?;
            writeln!(
                out,
                "{} is pending deletion until {}",
                md.arn,
                crate::human::utc_timestamp(md.deletion_date.unwrap_or(0))
            )?;
            return Ok(());
        }
        other => {
            return Err(KmsCommandError::Input(format!(
                "internal: {other:?} is not a key-state command"
            )));
        }
    };
    show(out, &md, false)
}

#[allow(clippy::too_many_arguments)]
fn create_key(
    kms: &LocalKms,
    me: &Caller,
    out: Out<'_>,
    description: &str,
    alias: Option<&str>,
    key_spec: String,
    origin: Origin,
    as_json: bool,
) -> Result<(), KmsCommandError> {
    let md = kms.create_key(description, alias, &KeySpec(key_spec), origin, me)?;
    if as_json {
        return show(out, &md, true);
    }
    writeln!(out, "{}\n{}", md.key_id, md.arn)?;
    Ok(())
}

fn list_key_rotations(
    kms: &LocalKms,
    me: &Caller,
    out: Out<'_>,
    key: &str,
    as_json: bool,
) -> Result<(), KmsCommandError> {
    let v = kms.list_key_rotations(key, me)?;
    if as_json {
        let j: Vec<_> = v
            .iter()
            .map(|(version, created, kind)| {
                serde_json::json!({"version": version, "created": created, "kind": kind})
            })
            .collect();
        return json(out, &j, false);
    }
    for (version, created, kind) in v {
        let when = crate::human::utc_timestamp(created);
        writeln!(out, "{version}  {when}  {kind}")?;
    }
    Ok(())
}

fn import_key_material(
    kms: &LocalKms,
    me: &Caller,
    out: Out<'_>,
    key: &str,
    material_file: &Path,
) -> Result<(), KmsCommandError> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(material_file)?);
    let mut material = zeroize::Zeroizing::new([0u8; 32]);
    if !crate::codec::hex_into(text.trim(), &mut material[..]) {
        return Err(KmsCommandError::Input(format!(
            "{} must hold 64 hex digits (32 bytes of key material)",
            material_file.display()
        )));
    }
    show(
        out,
        &kms.import_key_material(key, &material[..], me)?,
        false,
    )
}

fn list_aliases(
    kms: &LocalKms,
    me: &Caller,
    out: Out<'_>,
    as_json: bool,
) -> Result<(), KmsCommandError> {
    let v = kms.list_aliases(me)?;
    if as_json {
        let j: Vec<_> = v
            .iter()
            .map(|(a, k)| serde_json::json!({"alias": a, "key_id": k}))
            .collect();
        return json(out, &j, false);
    }
    for (a, k) in v {
        writeln!(out, "{a}  {k}")?;
    }
    Ok(())
}

fn create_grant(
    kms: &LocalKms,
    me: &Caller,
    out: Out<'_>,
    key: &str,
    grantee: &str,
    operations: &[String],
    context_subset: &[String],
) -> Result<(), KmsCommandError> {
    let mut ctx = crate::kms::EncryptionContext::default();
    for pair in context_subset {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            KmsCommandError::Input(format!("--context-subset {pair:?} must be KEY=VALUE"))
        })?;
        ctx.0.insert(k.to_owned(), v.to_owned());
    }
    let ops: Vec<&str> = operations.iter().map(String::as_str).collect();
    let id = crate::kms::KeyService::create_grant(kms, key, grantee, &ops, &ctx, me)?;
    writeln!(out, "{id}")?;
    Ok(())
}

fn list_grants(
    kms: &LocalKms,
    me: &Caller,
    out: Out<'_>,
    key: &str,
    as_json: bool,
) -> Result<(), KmsCommandError> {
    let grants = kms.list_grants(key, me)?;
    if as_json {
        return json(out, &grants, false);
    }
    for g in grants {
        let ops = g.operations.join(",");
        writeln!(out, "{}  {}  {ops}", g.grant_id, g.grantee)?;
    }
    Ok(())
}

fn audit(
    kms: &LocalKms,
    out: Out<'_>,
    operation: Option<&str>,
    volume: Option<&str>,
    failures: bool,
    as_json: bool,
) -> Result<(), KmsCommandError> {
    for r in kms.audit().read_all()? {
        if operation.is_some_and(|o| o != r.operation)
            || volume.is_some_and(|v| Some(v) != r.volume.as_deref())
            || (failures && r.outcome == "success")
        {
            continue;
        }
        if as_json {
            json(out, &r, true)?;
            continue;
        }
        let purpose = r
            .purpose
            .as_deref()
            .map(|p| format!("  ({p})"))
            .unwrap_or_default();
        let code = r.error_code.map(|c| format!("  {c}")).unwrap_or_default();
        writeln!(
            out,
            "{}  {:<20} {:<8} {}  {}{purpose}{code}",
            crate::human::utc_timestamp(r.time),
            r.operation,
            r.outcome,
            r.key,
            r.volume.as_deref().unwrap_or("-"),
        )?;
    }
    Ok(())
}
