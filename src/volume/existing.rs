//! Operations on volumes that already exist, and the checks `create` shares with them:
//! `import` (adopt a volume without writing to it), `delete` (refused while served unless
//! forced; crypto-shredding), which registered volume uses a path, and what a store holds.

use std::path::Path;

use super::backing::{self, DEFAULT_UPSTREAM};
use super::header::{self, HEADER_COPIES, HEADER_COPY_BYTES, Header};
use super::lease::{self, lock_exclusive};
use super::manager::Manager;
use super::ondisk::{Copies, Entry, ManagerError, check_name, io, update_header};
use super::probe::{self, Found, PROBE_BYTES};
use crate::crypto::BackendChoice;
use crate::storage::Storage;

/// Reads what is at the start (and end) of an existing store (a path or an upstream).
pub(super) fn probe_path(path: &Path) -> Result<Found, ManagerError> {
    let store = backing::open(path, true, &DEFAULT_UPSTREAM)
        .map_err(io("cannot open the backing store", path))?;
    let len = store.size().map_err(io("cannot find the size of", path))?;
    let head_len = usize::try_from(len.min(PROBE_BYTES as u64)).unwrap_or(PROBE_BYTES);
    let mut head = vec![0u8; head_len];
    store
        .read_at(&mut head, 0)
        .map_err(io("cannot read", path))?;
    let mut tail = Vec::new();
    if len > PROBE_BYTES as u64 {
        let tail_len = usize::try_from((len - PROBE_BYTES as u64).min(PROBE_BYTES as u64))
            .unwrap_or(PROBE_BYTES);
        tail = vec![0u8; tail_len];
        store
            .read_at(&mut tail, len - tail_len as u64)
            .map_err(io("cannot read", path))?;
    }
    Ok(probe::examine(&head, &tail))
}

impl Manager<'_> {
    /// The live (or pending) volume whose backing store is `path`, if any.
    pub(super) fn user_of(
        &self,
        path: &Path,
        except: &str,
    ) -> Result<Option<String>, ManagerError> {
        Ok(self
            .list()?
            .into_iter()
            .find(|e| !e.deleted && e.name != except && backing::same(&e.backing, path))
            .map(|e| e.name))
    }

    /// Refuses a name that is taken (live or pending).
    pub(super) fn check_free(&self, name: &str) -> Result<Option<Entry>, ManagerError> {
        check_name(name)?;
        match self.entry(name) {
            Ok(e) if e.pending.is_some() => Err(ManagerError::Refused(format!(
                "volume {name} exists but is incomplete (its creation was interrupted): finish it with `nbdcrypt volume create {name} --resume`, or remove it with `nbdcrypt volume delete {name}`"
            ))),
            Ok(e) if !e.deleted => Err(ManagerError::Exists(name.into())),
            Ok(e) => Ok(Some(e)),
            Err(ManagerError::NoSuchVolume(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `volume import NAME --backing PATH`: registers an existing volume after checking its
    /// header and that the KMS unwraps its key. Writes nothing to the store.
    pub fn import(&self, name: &str, backing: &Path) -> Result<Header, ManagerError> {
        // A tombstone of the same name is simply replaced.
        self.check_free(name)?;
        if let Some(other) = self.user_of(backing, name)? {
            return Err(ManagerError::Refused(format!(
                "{} is already registered as volume {other}",
                backing.display()
            )));
        }
        let store = self.open_backing(backing, true)?;
        let h = match super::ondisk::read_header_from(store.as_ref(), name) {
            Ok(l) => l.header,
            Err(ManagerError::Header {
                first: header::HeaderError::Magic,
                ..
            }) => {
                return Err(ManagerError::Refused(format!(
                    "{} holds no nbdcrypt volume ({}); `volume import` adopts existing nbdcrypt volumes only",
                    backing.display(),
                    probe_path(backing).map_or_else(|e| e.to_string(), |f| f.to_string())
                )));
            }
            Err(e) => return Err(e.at(backing)),
        };
        if h.deleted {
            return Err(ManagerError::Refused(format!(
                "{} holds deleted volume {:?}: its key was destroyed, there is nothing to import",
                backing.display(),
                h.name
            )));
        }
        if h.incomplete {
            return Err(ManagerError::Refused(format!(
                "{} holds volume {:?} whose creation never finished; finish it where it was created",
                backing.display(),
                h.name
            )));
        }
        super::manager::check_length(name, backing, store.as_ref(), h.size)?;
        // Proves the key service can unwrap it; the engine (and key) are dropped at once.
        drop(self.unwrap_engine(name, &h, BackendChoice::Auto)?);
        self.save_entry(&Entry {
            name: name.into(),
            backing: backing.to_owned(),
            uuid: h.uuid_hex(),
            deleted: false,
            grant: None,
            pending: None,
        })?;
        Ok(h)
    }

    /// `volume delete`: destroys the wrapped key in both header copies (crypto-shredding),
    /// leaves a tombstone, and removes the backing file unless `keep_ciphertext`. A volume
    /// being served is refused, naming the server, unless `force` (the server then withdraws
    /// it within a second and wipes its key).
    pub fn delete(
        &self,
        name: &str,
        keep_ciphertext: bool,
        force: bool,
    ) -> Result<(), ManagerError> {
        let mut entry = self.entry(name)?;
        if entry.deleted {
            return Err(ManagerError::Deleted(name.into()));
        }
        let store = match backing::open(&entry.backing, false, &self.upstream) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("cannot open the backing store", &entry.backing)(e)),
        };
        if let Some(store) = &store {
            self.claim_for_delete(name, store.as_ref(), force)?;
        }
        let header_ours = !entry.uuid.is_empty();
        // Without a uuid, a creation was killed before its header: nothing of ours is there.
        if let (Some(store), true) = (&store, header_ours) {
            shred(name, store.as_ref(), &entry.backing)?;
        }
        if let Some((key, id)) = entry.grant.take()
            && let Err(e) = self.kms.retire_grant(&key, &id, &self.admin)
        {
            tracing::warn!(volume = name, error = %e, "could not retire the serving grant; revoke it with `nbdcrypt kms revoke-grant`");
        }
        let ours_to_remove = entry.pending.as_ref().is_none_or(|p| p.created_backing);
        if !keep_ciphertext && ours_to_remove && entry.backing.is_file() {
            std::fs::remove_file(&entry.backing).map_err(io("cannot remove", &entry.backing))?;
        }
        entry.deleted = true;
        entry.pending = None;
        self.save_entry(&entry)
    }

    /// Holds the volume's serving lock for a delete, or refuses while a server has it (or a
    /// fresh lease of another node says one does) unless `force`.
    fn claim_for_delete(
        &self,
        name: &str,
        store: &dyn Storage,
        force: bool,
    ) -> Result<(), ManagerError> {
        const HINT: &str = "; stop that server first, or add --force to cut its clients off and destroy the key in its memory now";
        match lock_exclusive(store, name, HINT) {
            Ok(()) => {
                let remote = super::ondisk::read_header_from(store, name)
                    .ok()
                    .and_then(|l| lease::foreign_live_lease(&l.header, store.has_locks()).cloned());
                match remote {
                    Some(holder) if !force => Err(ManagerError::Busy {
                        volume: name.into(),
                        holder: Some(holder),
                        hint: HINT.into(),
                    }),
                    _ => Ok(()),
                }
            }
            Err(ManagerError::Busy { holder, .. }) if force => {
                tracing::warn!(volume = name, holder = ?holder.map(|h| h.to_string()), "--force: deleting a volume that is being served");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Crypto-shredding: both header copies lose the wrapped key and say deleted (newest last, so
/// no copy of the blob survives either way). Unreadable headers are zeroed instead.
fn shred(name: &str, store: &dyn Storage, path: &Path) -> Result<(), ManagerError> {
    let r = update_header(store, name, Copies::Both, |h| {
        h.deleted = true;
        h.wrapped_key.clear();
        h.key_check = [0; 32];
        Ok(true)
    });
    match r {
        Ok(_) => Ok(()),
        Err(ManagerError::Header { .. }) => {
            tracing::warn!(
                volume = name,
                "headers unreadable; wiping both header slots"
            );
            wipe_slots(store, path)
        }
        Err(e) => Err(e.at(path)),
    }
}

/// Zeroes both header slots of the store at `path` (a path or an upstream).
pub(super) fn wipe_header_slots(path: &Path) -> Result<(), ManagerError> {
    let store = backing::open(path, false, &DEFAULT_UPSTREAM)
        .map_err(io("cannot open the backing store", path))?;
    wipe_slots(store.as_ref(), path)
}

fn wipe_slots(store: &dyn Storage, path: &Path) -> Result<(), ManagerError> {
    store
        .write_durable_at(&vec![0u8; HEADER_COPY_BYTES * HEADER_COPIES], 0)
        .map_err(io("cannot wipe the header of", path))
}
