//! `nbdcrypt volume …`: named volumes on the local KMS.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::cli::{VolumeCommand, VolumeCreateArgs};
use crate::human::{iec_bytes, utc_timestamp};
use crate::kms::KeyService;
use crate::volume::header::{DATA_OFFSET, Header, VolumeType};
use crate::volume::lifecycle::CreateOptions;
use crate::volume::manager::{Entry, Manager, ManagerError, read_header};

/// No state directory could be chosen.
#[derive(Debug, thiserror::Error)]
#[error(
    "no state directory: HOME and XDG_STATE_HOME are unset and user {uid} has no home directory in the password database; pass --state-dir DIR (or set NBDCRYPT_STATE_DIR)"
)]
pub struct NoStateDir {
    /// The user.
    pub uid: u32,
}

/// The state directory: `--state-dir`/`NBDCRYPT_STATE_DIR`, else `$XDG_STATE_HOME/nbdcrypt`,
/// else `$HOME/.local/state/nbdcrypt`, else `.local/state/nbdcrypt` under the user's home
/// directory from the password database (HOME unset, e.g. under some service managers). Never
/// the current directory.
pub fn state_dir(given: Option<PathBuf>) -> Result<PathBuf, NoStateDir> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = given
        .or_else(|| nonempty("XDG_STATE_HOME").map(|d| PathBuf::from(d).join("nbdcrypt")))
        .or_else(|| nonempty("HOME").map(|h| PathBuf::from(h).join(".local/state/nbdcrypt")))
    {
        return Ok(d);
    }
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.dir)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(".local/state/nbdcrypt"))
        .ok_or(NoStateDir { uid: uid.as_raw() })
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

/// Without `--size` on an upstream backing: the export less the header area, in whole sectors.
fn upstream_volume_size(backing: &Path, args: &VolumeCreateArgs) -> Result<u64, ManagerError> {
    use crate::volume::backing;
    let len = backing::open(backing, true, &backing::DEFAULT_UPSTREAM)
        .and_then(|s| s.size())
        .map_err(|source| ManagerError::Io {
            what: "cannot find the size of",
            path: backing.to_owned(),
            source,
        })?;
    let sector = args.sector_size.bytes() as u64;
    let size = len.saturating_sub(DATA_OFFSET) / sector * sector;
    if size == 0 {
        return Err(ManagerError::Refused(format!(
            "{} holds {len} bytes: no room for a volume after the {DATA_OFFSET}-byte header area",
            backing.display()
        )));
    }
    Ok(size)
}

/// Creates a volume with the settings of `args` (without preallocating).
pub fn create(
    m: &Manager<'_>,
    args: &VolumeCreateArgs,
) -> Result<crate::volume::header::Header, ManagerError> {
    let size = match (args.size, &args.backing) {
        (Some(size), _) => size,
        (None, Some(b)) if crate::volume::backing::is_upstream(b) => upstream_volume_size(b, args)?,
        (None, _) => return Err(ManagerError::Refused("--size is required".into())),
    };
    m.create(
        &args.name,
        &CreateOptions {
            size,
            volume_type: args.volume_type,
            kms_key: args.kms_key.clone(),
            sector_size: args.sector_size,
            backing: args.backing.clone(),
            discards: args.discards,
            preallocate: args.preallocate,
            force: args.force,
        },
    )
}

/// What is wrong with a live volume's store, if anything (for `list` and `describe`).
fn store_problem(e: &Entry, h: &Header) -> Option<String> {
    let needed = DATA_OFFSET.saturating_add(h.size);
    let opened =
        crate::volume::backing::open(&e.backing, true, &crate::volume::backing::DEFAULT_UPSTREAM);
    match opened.and_then(|s| s.size()) {
        Ok(len) if len < needed => Some(format!(
            "backing store is {}, volume needs {}",
            iec_bytes(len),
            iec_bytes(needed)
        )),
        Ok(_) => None,
        Err(err) => Some(format!("backing store unusable: {err}")),
    }
}

/// The describable, non-secret facts of a volume (raw numbers; the text output formats them).
fn describe_json(m: &Manager<'_>, name: &str) -> Result<serde_json::Value, ManagerError> {
    let e = m.entry(name)?;
    if e.deleted {
        return Ok(serde_json::json!({ "name": e.name, "state": "deleted", "backing": e.backing }));
    }
    let pending_size = e.pending.as_ref().map(|p| p.size);
    let loaded = match read_header(&e.backing, name) {
        Ok(l) => l,
        Err(err) => {
            // A creation killed before its header, or a store that went away.
            let state = if e.pending.is_some() {
                "incomplete"
            } else {
                "unreadable"
            };
            return Ok(serde_json::json!({
                "name": e.name, "state": state, "backing": e.backing, "size": pending_size,
                "problem": if e.pending.is_some() {
                    format!("creation interrupted before the header was written; `nbdcrypt volume create {name} --resume` or `nbdcrypt volume delete {name}`")
                } else { err.to_string() },
            }));
        }
    };
    let h = loaded.header;
    let state = if h.deleted {
        "deleted"
    } else if h.incomplete || e.pending.is_some() {
        "incomplete"
    } else {
        "available"
    };
    let mut v = serde_json::json!({
        "name": e.name,
        "uuid": e.uuid,
        "type": h.volume_type.to_string(),
        "state": state,
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
    if h.incomplete {
        v["preallocated"] = h.progress.into();
        v["problem"] = format!(
            "creation interrupted after {} of {} were preallocated; `nbdcrypt volume create {name} --resume` or `nbdcrypt volume delete {name}`",
            iec_bytes(h.progress),
            iec_bytes(h.size)
        )
        .into();
    } else if h.rekey.is_some() {
        v["state"] = "reencrypting".into();
        v["problem"] = format!(
            "re-encryption under a new data key was interrupted; `nbdcrypt volume reencrypt {name}` finishes it"
        )
        .into();
    } else if !h.deleted
        && let Some(problem) = store_problem(&e, &h)
    {
        v["state"] = "damaged".into();
        v["problem"] = problem.into();
    }
    if let Some(l) = &h.lease {
        v["served_by"] = serde_json::json!({
            "node": l.node, "pid": l.pid, "since": l.started, "heartbeat_ms": l.heartbeat_ms,
            "stale": l.is_stale(crate::human::now_ms()),
        });
    }
    if let Some(d) = &loaded.damaged {
        v["damaged_copy"] = d.to_string().into();
    }
    Ok(v)
}

/// One `describe` value as text: sizes in IEC units, times as UTC timestamps.
fn human_value(key: &str, val: &serde_json::Value) -> String {
    match (key, val.as_u64()) {
        ("size" | "preallocated", Some(n)) => format!("{} ({n} bytes)", iec_bytes(n)),
        ("created", Some(t)) => utc_timestamp(t),
        _ if key == "served_by" => {
            let node = val["node"].as_str().unwrap_or("?");
            let since = val["since"]
                .as_u64()
                .map_or_else(|| "?".into(), utc_timestamp);
            let stale = if val["stale"].as_bool() == Some(true) {
                " (stale: no heartbeat for three intervals)"
            } else {
                ""
            };
            format!("pid {} on {node}, since {since}{stale}", val["pid"])
        }
        _ => val.as_str().map_or_else(|| val.to_string(), str::to_owned),
    }
}

fn print_list(out: &mut impl Write, all: &[serde_json::Value]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<24} {:<11} {:<11} {:>10}  PROBLEM",
        "NAME", "TYPE", "STATE", "SIZE"
    )?;
    for v in all {
        writeln!(
            out,
            "{:<24} {:<11} {:<11} {:>10}  {}",
            v["name"].as_str().unwrap_or("?"),
            v["type"].as_str().unwrap_or("-"),
            v["state"].as_str().unwrap_or("?"),
            v["size"].as_u64().map_or_else(|| "-".into(), iec_bytes),
            v["problem"].as_str().unwrap_or(""),
        )?;
    }
    Ok(())
}

fn json_text(v: &impl serde::Serialize) -> Result<String, VolumeCommandError> {
    serde_json::to_string_pretty(v).map_err(|e| VolumeCommandError::Io(std::io::Error::other(e)))
}

/// Preallocates with a progress bar; Ctrl-C (or SIGTERM) checkpoints and says how to go on.
fn preallocate(m: &Manager<'_>, h: &Header) -> Result<(), ManagerError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&stop)) {
            tracing::warn!(error = %e, "cannot catch Ctrl-C: an interruption loses up to one checkpoint of progress");
        }
    }
    let bar = super::progress::bytes(h.size, "preallocating");
    let mut done = 0u64;
    let finished = m.preallocate(
        &h.name,
        |n| {
            done += n;
            bar.inc(n);
        },
        &stop,
    )?;
    bar.finish_and_clear();
    if finished {
        return Ok(());
    }
    Err(ManagerError::Incomplete {
        volume: h.name.clone(),
        done,
        size: h.size,
    })
}

/// Runs a `volume` subcommand: one handler per command.
pub fn run(
    state: &Path,
    kms: &dyn KeyService,
    kms_name: &str,
    cmd: VolumeCommand,
    out: &mut impl Write,
) -> Result<(), VolumeCommandError> {
    let m = Manager::new(state, kms, kms_name);
    match cmd {
        VolumeCommand::Create(args) => run_create(&m, &args, out),
        VolumeCommand::Import { name, backing } => {
            let h = m.import(&name, &backing)?;
            let called = if h.name == name {
                String::new()
            } else {
                format!("; its header calls it {:?}", h.name)
            };
            writeln!(
                out,
                "imported {} volume {name} ({}, created {}){called}",
                h.volume_type,
                iec_bytes(h.size),
                utc_timestamp(h.created),
            )?;
            Ok(())
        }
        VolumeCommand::List { json } => run_list(&m, state, json, out),
        VolumeCommand::Describe { name, json } => {
            let v = describe_json(&m, &name)?;
            if json {
                writeln!(out, "{}", json_text(&v)?)?;
            } else if let Some(map) = v.as_object() {
                for (k, val) in map {
                    writeln!(out, "{k:<12} {}", human_value(k, val))?;
                }
            }
            Ok(())
        }
        VolumeCommand::Rewrap { name, kms_key } => {
            let h = m.rewrap(&name, &kms_key)?;
            writeln!(out, "volume {name} is now wrapped by {}", h.key_id)?;
            Ok(())
        }
        VolumeCommand::Resize { name, size } => super::volume_ops::resize(&m, &name, size, out),
        VolumeCommand::Reencrypt {
            name,
            json,
            backend,
        } => super::volume_ops::reencrypt(&m, &name, json, backend, out),
        VolumeCommand::ExportKey { name, confirm } => {
            if !confirm {
                return Err(ManagerError::Refused(
                    "export-key prints the volume's plaintext key: add --confirm".into(),
                )
                .into());
            }
            let key = m.export_key(&name)?;
            writeln!(out, "{}", key.as_str())?;
            Ok(())
        }
        VolumeCommand::Delete {
            name,
            keep_ciphertext,
            wipe,
            force,
        } => run_delete(&m, &name, keep_ciphertext, wipe, force, out),
    }
}

fn run_create(
    m: &Manager<'_>,
    args: &VolumeCreateArgs,
    out: &mut impl Write,
) -> Result<(), VolumeCommandError> {
    let (h, prealloc) = if args.resume {
        m.resume(&args.name)?
    } else {
        let h = create(m, args)?;
        let p = h.incomplete;
        (h, p)
    };
    if prealloc {
        preallocate(m, &h)?;
    }
    writeln!(
        out,
        "{} {} volume {} ({}, {}-byte sectors)",
        if args.resume { "finished" } else { "created" },
        h.volume_type,
        h.name,
        iec_bytes(h.size),
        h.sector_size
    )?;
    Ok(())
}

fn run_list(
    m: &Manager<'_>,
    state: &Path,
    json: bool,
    out: &mut impl Write,
) -> Result<(), VolumeCommandError> {
    if !state.exists() {
        if json {
            writeln!(out, "[]")?;
        } else {
            writeln!(
                out,
                "no volumes: the state directory {} does not exist (the first `nbdcrypt volume create` or `nbdcrypt serve` creates it; --state-dir picks another)",
                state.display()
            )?;
        }
        return Ok(());
    }
    let mut all = Vec::new();
    for e in m.list()? {
        all.push(describe_json(m, &e.name).unwrap_or_else(|err| {
            serde_json::json!({ "name": e.name, "state": "unreadable", "problem": err.to_string() })
        }));
    }
    if json {
        writeln!(out, "{}", json_text(&all)?)?;
    } else {
        print_list(out, &all)?;
    }
    Ok(())
}

fn run_delete(
    m: &Manager<'_>,
    name: &str,
    keep_ciphertext: bool,
    wipe: bool,
    force: bool,
    out: &mut impl Write,
) -> Result<(), VolumeCommandError> {
    if wipe {
        let bar = super::progress::bytes(m.data_bytes(name)?, "wiping");
        m.wipe_data(name, force, |n| bar.inc(n))?;
        bar.finish_and_clear();
    }
    let upstream = m
        .entry(name)
        .is_ok_and(|e| crate::volume::backing::is_upstream(&e.backing));
    m.delete(name, keep_ciphertext, force)?;
    writeln!(
        out,
        "deleted volume {name}: its key is destroyed{}",
        if keep_ciphertext {
            "; the ciphertext was kept"
        } else if upstream {
            "; its ciphertext stays in the upstream export until its owner removes it"
        } else {
            " and its backing file removed"
        }
    )?;
    Ok(())
}
