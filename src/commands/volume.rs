//! `nbdcrypt volume …`: named volumes on the local KMS.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cli::{VolumeCommand, VolumeCreateArgs};
use crate::kms::KeyService;
use crate::volume::header::VolumeType;
use crate::volume::manager::{CreateOptions, Manager, ManagerError, read_header};

/// The state directory: the flag/env value, else `$XDG_STATE_HOME/nbdcrypt`, else
/// `~/.local/state/nbdcrypt`, else `./.nbdcrypt`.
pub fn state_dir(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("XDG_STATE_HOME").map(|d| PathBuf::from(d).join("nbdcrypt")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/nbdcrypt"))
        })
        .unwrap_or_else(|| PathBuf::from(".nbdcrypt"))
}

/// Errors of `volume` commands.
#[derive(Debug, thiserror::Error)]
pub enum VolumeCommandError {
    /// The volume layer refused.
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// Output failed.
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
}

/// Creates a volume with the settings of `args`.
pub fn create(
    m: &Manager<'_>,
    args: &VolumeCreateArgs,
) -> Result<crate::volume::header::Header, ManagerError> {
    m.create(
        &args.name,
        &CreateOptions {
            size: args.size,
            volume_type: if args.volume_type == "persistent" {
                VolumeType::Persistent
            } else {
                VolumeType::Scratch
            },
            kms_key: args.kms_key.clone(),
            sector_size: args.sector_size,
            backing: args.backing.clone(),
            discards: args.discards,
        },
    )
}

/// The describable, non-secret facts of a volume.
fn describe_json(m: &Manager<'_>, name: &str) -> Result<serde_json::Value, ManagerError> {
    let e = m.entry(name)?;
    if e.deleted {
        return Ok(serde_json::json!({ "name": e.name, "state": "deleted", "backing": e.backing }));
    }
    let h = read_header(&e.backing, name)?.header;
    let mut v = serde_json::json!({
        "name": h.name,
        "uuid": e.uuid,
        "type": h.volume_type.to_string(),
        "state": if h.deleted { "deleted" } else { "available" },
        "size": h.size,
        "sector_size": h.sector_size,
        "cipher": crate::volume::header::CIPHER,
        "discards": h.discards,
        "backing": e.backing,
        "created": h.created,
        "kms": h.kms,
    });
    // FSx: persistent file systems show their KMS key; scratch ones never do.
    if h.volume_type == VolumeType::Persistent {
        v["kms_key"] = serde_json::Value::String(h.key_id.clone());
    }
    Ok(v)
}

/// Runs a `volume` subcommand.
pub fn run(
    state: &Path,
    kms: &dyn KeyService,
    kms_name: &str,
    cmd: VolumeCommand,
    out: &mut impl Write,
) -> Result<(), VolumeCommandError> {
    let m = Manager::new(state, kms, kms_name);
    match cmd {
        VolumeCommand::Create(args) => {
            let h = create(&m, &args)?;
            if args.preallocate {
                let bar = super::progress::bytes(h.size, "preallocating");
                m.preallocate(&h.name, |n| bar.inc(n))?;
                bar.finish_and_clear();
            }
            writeln!(
                out,
                "created {} volume {} ({} bytes, {}-byte sectors)",
                h.volume_type, h.name, h.size, h.sector_size
            )?;
        }
        VolumeCommand::List { json } => {
            let mut all = Vec::new();
            for e in m.list()? {
                all.push(describe_json(&m, &e.name).unwrap_or_else(|err| {
                    serde_json::json!({ "name": e.name, "state": "unreadable", "error": err.to_string() })
                }));
            }
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&all).unwrap_or_default()
                )?;
            } else {
                writeln!(
                    out,
                    "{:<24} {:<11} {:<10} {:>14}",
                    "NAME", "TYPE", "STATE", "SIZE"
                )?;
                for v in all {
                    writeln!(
                        out,
                        "{:<24} {:<11} {:<10} {:>14}",
                        v["name"].as_str().unwrap_or("?"),
                        v["type"].as_str().unwrap_or("-"),
                        v["state"].as_str().unwrap_or("?"),
                        v["size"]
                            .as_u64()
                            .map_or_else(|| "-".into(), |s| s.to_string()),
                    )?;
                }
            }
        }
        VolumeCommand::Describe { name, json } => {
            let v = describe_json(&m, &name)?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                )?;
            } else if let Some(map) = v.as_object() {
                for (k, val) in map {
                    writeln!(
                        out,
                        "{k:<12} {}",
                        val.as_str().map_or_else(|| val.to_string(), str::to_owned)
                    )?;
                }
            }
        }
        VolumeCommand::Rewrap { name, kms_key } => {
            let h = m.rewrap(&name, &kms_key)?;
            writeln!(out, "volume {name} is now wrapped by {}", h.key_id)?;
        }
        VolumeCommand::ExportKey { name, confirm } => {
            if !confirm {
                return Err(ManagerError::Refused(
                    "export-key prints the volume's plaintext key: add --confirm".into(),
                )
                .into());
            }
            let key = m.export_key(&name)?;
            writeln!(out, "{}", key.as_str())?;
        }
        VolumeCommand::Delete {
            name,
            keep_ciphertext,
            wipe,
        } => {
            if wipe {
                let bar = super::progress::bytes(m.data_bytes(&name)?, "wiping");
                m.wipe_data(&name, |n| bar.inc(n))?;
                bar.finish_and_clear();
            }
            m.delete(&name, keep_ciphertext)?;
            writeln!(
                out,
                "deleted volume {name}: its key is destroyed{}",
                if keep_ciphertext {
                    "; the ciphertext was kept"
                } else {
                    " and its backing file removed"
                }
            )?;
        }
    }
    Ok(())
}
