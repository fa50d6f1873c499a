//! Creating volumes without losing data by mistake: `create` (all or nothing, resumable) and
//! `--resume`. Adopting and deleting existing volumes, and the checks shared with them, are in
//! [`super::existing`].
//!
//! Rules kept here:
//! - a backing path that holds anything (our header, a file system, a partition table, any
//!   non-zero byte) is refused unless `--force`; a path another registered volume uses is
//!   refused always;
//! - `create` registers the volume as *pending* before touching the store, so a failure rolls
//!   back (the file it made is removed, the entry too) and a kill leaves a volume that `list`
//!   shows as incomplete, `create --resume` finishes and `delete` removes;
//! - commands that change a volume hold its serving lock while they run.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::existing::{probe_path, wipe_header_slots};
use super::header::{DATA_OFFSET, Header, VolumeType};
use super::lease::lock_for_change;
use super::manager::{Manager, engine_with_check};
use super::ondisk::{Copies, Entry, ManagerError, Pending, io, update_header};
use super::probe::Found;
use crate::codec::to_hex as hex;
use crate::crypto::{self, BackendChoice, SectorSize};
use crate::kms::local::DEFAULT_ALIAS;
use crate::storage::{Storage, StoreLock};

/// Settings for `volume create`.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Size in bytes.
    pub size: u64,
    /// Scratch or persistent.
    pub volume_type: VolumeType,
    /// KMS key for persistent volumes (default: the managed default key).
    pub kms_key: Option<String>,
    /// Sector size.
    pub sector_size: SectorSize,
    /// Backing file (default: `<state-dir>/volumes/<name>.img`).
    pub backing: Option<PathBuf>,
    /// Discards on.
    pub discards: bool,
    /// Encrypted zeroes over the whole data area (then `Manager::preallocate`); the volume
    /// stays incomplete until that finishes.
    pub preallocate: bool,
    /// Overwrite a backing store that holds data.
    pub force: bool,
}

use crate::faults::crash_point;

impl Manager<'_> {
    /// Refuses a backing path another volume uses, and (without `force`) one that holds data.
    fn check_backing(&self, name: &str, path: &Path, force: bool) -> Result<bool, ManagerError> {
        if let Some(other) = self.user_of(path, name)? {
            return Err(ManagerError::Refused(format!(
                "{} is the backing store of volume {other}; two volumes cannot share one (not even with --force)",
                path.display()
            )));
        }
        // An upstream export always exists (the storage engine made it); a path may not yet.
        let meta = if super::backing::is_upstream(path) {
            None
        } else {
            match std::fs::metadata(path) {
                Ok(m) => Some(m),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(io("cannot examine", path)(e)),
            }
        };
        if meta.is_some_and(|m| m.is_dir()) {
            return Err(ManagerError::Refused(format!(
                "{} is a directory; --backing takes a file or block device path, or an nbd:// or nbd+unix:// URI",
                path.display()
            )));
        }
        let found = probe_path(path)?;
        if found == Found::Empty || force {
            if found != Found::Empty {
                tracing::warn!(backing = %path.display(), %found, "--force: overwriting it");
            }
            return Ok(true);
        }
        let way_out = match &found {
            Found::Nbdcrypt { deleted: false, .. } => format!(
                "adopt it with `nbdcrypt volume import {name} --backing {}`, or pick another path",
                path.display()
            ),
            _ => "pick another path, or add --force to overwrite it (its contents are lost)".into(),
        };
        Err(ManagerError::Refused(format!(
            "{} already holds {found}; nothing was written: {way_out}",
            path.display()
        )))
    }

    /// `volume create`: refuses a taken name or a backing store with data, registers the
    /// volume as pending, makes the backing file, a data key (`GenerateDataKey`) and the
    /// header. Any failure undoes what was done; a kill leaves a pending volume (see the
    /// module docs). With `preallocate`, the header says incomplete until
    /// [`Manager::preallocate`] finishes.
    pub fn create(&self, name: &str, opts: &CreateOptions) -> Result<Header, ManagerError> {
        let tombstone = self.check_free(name)?;
        let sector = opts.sector_size.bytes() as u64;
        if opts.size == 0 || !opts.size.is_multiple_of(sector) {
            return Err(ManagerError::Refused(format!(
                "size {} is not a positive multiple of the {sector}-byte sector size",
                opts.size
            )));
        }
        if opts.volume_type == VolumeType::Scratch && opts.kms_key.is_some() {
            return Err(ManagerError::Refused(
                "scratch volumes always use the service-managed default key; --kms-key is for persistent volumes".into(),
            ));
        }
        let backing = opts.backing.clone().unwrap_or_else(|| {
            crate::fsutil::StateLayout::new(self.state_dir()).default_backing(name)
        });
        let exists = self.check_backing(name, &backing, opts.force)?;
        let pending = Pending {
            size: opts.size,
            volume_type: opts.volume_type,
            kms_key: opts.kms_key.clone(),
            sector_size: u16::try_from(sector).unwrap_or(4096),
            discards: opts.discards,
            preallocate: opts.preallocate,
            created_backing: !exists,
        };
        let mut entry = Entry {
            name: name.into(),
            backing,
            uuid: String::new(),
            deleted: false,
            grant: None,
            pending: Some(pending),
        };
        // Registered before anything is written: whatever happens next is visible.
        self.save_entry(&entry)?;
        crash_point("registered");
        let mut grant = None;
        match self.build(&mut entry, &mut grant) {
            Ok(h) => Ok(h),
            Err(e) => {
                self.roll_back(&entry, grant, tombstone);
                Err(e)
            }
        }
    }

    /// Undoes a failed creation: the grant, the file it made (or our header on a store it did
    /// not make), the entry (a previous tombstone comes back).
    fn roll_back(&self, entry: &Entry, grant: Option<(String, String)>, tombstone: Option<Entry>) {
        let name = &entry.name;
        if let Some((key, id)) = grant
            && let Err(e) = self.kms.retire_grant(&key, &id, &self.admin)
        {
            tracing::warn!(volume = name, error = %e, "could not retire the grant of the failed creation");
        }
        let created = entry.pending.as_ref().is_some_and(|p| p.created_backing);
        if created {
            if let Err(e) = std::fs::remove_file(&entry.backing)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(volume = name, error = %e, backing = %entry.backing.display(), "could not remove the backing file of the failed creation");
            }
        } else if !entry.uuid.is_empty() {
            let _ = wipe_header_slots(&entry.backing);
        }
        let restored = match tombstone {
            Some(t) => self.save_entry(&t),
            None => self.remove_entry(name),
        };
        if let Err(e) = restored {
            tracing::warn!(volume = name, error = %e, "could not undo the registry entry");
        }
    }

    /// The steps of a creation after registration (also what `--resume` redoes when the
    /// header was never written). Sets `entry.uuid` once the header area is ours.
    fn build(
        &self,
        entry: &mut Entry,
        grant_out: &mut Option<(String, String)>,
    ) -> Result<Header, ManagerError> {
        let name = entry.name.clone();
        let p = entry.pending.clone().ok_or_else(|| {
            ManagerError::Refused(format!("volume {name} has no creation to finish"))
        })?;
        let backing = entry.backing.clone();
        if !super::backing::is_upstream(&backing) {
            Self::make_backing_file(&backing, p.size)?;
        }
        crash_point("sized");
        let store = self.open_backing(&backing, false)?;
        super::manager::check_length(&name, &backing, store.as_ref(), p.size)?;
        lock_for_change(store.as_ref(), &name, "; wait for it to finish")?;
        let sector_size = SectorSize::from_bytes(u64::from(p.sector_size)).map_err(|source| {
            ManagerError::Crypto {
                volume: name.clone(),
                source,
            }
        })?;
        let key_id = match (p.volume_type, &p.kms_key) {
            (VolumeType::Persistent, Some(k)) => k.clone(),
            _ => DEFAULT_ALIAS.to_owned(),
        };
        let mut uuid = [0u8; 16];
        getrandom::fill(&mut uuid).map_err(|source| ManagerError::Entropy {
            what: "the volume id",
            source,
        })?;
        let context = Self::context(&uuid, &name);
        let kms_err = |source| ManagerError::Kms {
            volume: name.clone(),
            source,
        };
        // A customer-managed key: the administrator grants the serving principal what it
        // needs, for this volume's context only (as FSx does for persistent file systems).
        *grant_out = self.grant_for(&key_id, &uuid).map_err(kms_err)?;
        let mut dk = self
            .kms
            .generate_data_key(&key_id, crypto::VOLUME_KEY_BYTES, &context, &self.caller)
            .map_err(kms_err)?;
        // Before the wrapped key goes into both header copies: it must unwrap to the key in
        // hand, or the volume would be written under a key nobody can recover.
        self.verify_wrap(&name, &dk.key_arn, &dk.blob, &context, |plain| {
            crate::codec::ct_eq(plain, &dk.plaintext)
        })?;
        let (_engine, key_check) =
            engine_with_check(&name, &mut dk.plaintext, sector_size, BackendChoice::Auto)?;
        let mut h = Header {
            sequence: 1,
            uuid,
            name: name.clone(),
            volume_type: p.volume_type,
            size: p.size,
            sector_size: p.sector_size,
            discards: p.discards,
            deleted: false,
            created: crate::human::now_secs(),
            kms: self.kms_name.clone(),
            key_id: dk.key_arn.clone(),
            wrapped_key: dk.blob.clone(),
            context: context
                .0
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            key_check,
            incomplete: p.preallocate,
            progress: 0,
            lease: None,
            rekey: None,
        };
        entry.uuid = hex(&uuid);
        entry.grant = grant_out.clone();
        self.save_entry(entry)?;
        crash_point("key-generated");
        // A reused store must not show old data: zero the whole header area, then both copies.
        store
            .write_at(&vec![0u8; DATA_OFFSET as usize], 0)
            .map_err(io("cannot initialise", &backing))?;
        super::ondisk::write_slot(&store, &name, &h, 0).map_err(|e| e.at(&backing))?;
        h.sequence = 2;
        super::ondisk::write_slot(&store, &name, &h, 1).map_err(|e| e.at(&backing))?;
        crash_point("header-written");
        if !p.preallocate {
            entry.pending = None;
            self.save_entry(entry)?;
        }
        let _ = store.unlock(StoreLock::Serving);
        Ok(h)
    }

    /// Creates (or reuses) the backing file `backing` and makes it long enough for a volume of
    /// `size` bytes plus the header area; a block device is left as it is.
    fn make_backing_file(backing: &Path, size: u64) -> Result<(), ManagerError> {
        if let Some(parent) = backing.parent() {
            crate::fsutil::create_private_dir(parent).map_err(io("cannot create", parent))?;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(backing)
            .map_err(io("cannot create the backing file", backing))?;
        let meta = f.metadata().map_err(io("cannot stat", backing))?;
        let needed = DATA_OFFSET.saturating_add(size);
        if meta.is_file() && meta.len() < needed {
            f.set_len(needed).map_err(|source| {
                let why = if source.raw_os_error() == Some(libc::EFBIG) {
                    "cannot size the backing file (larger than its file system allows) to"
                } else {
                    "cannot size the backing file to"
                };
                ManagerError::Io {
                    what: why,
                    path: PathBuf::from(format!(
                        "{} ({})",
                        backing.display(),
                        crate::human::iec_bytes(needed)
                    )),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// `volume create NAME --resume`: finishes an interrupted creation. Returns the header and
    /// whether preallocation is still to be done.
    pub fn resume(&self, name: &str) -> Result<(Header, bool), ManagerError> {
        let mut entry = self.entry(name)?;
        if entry.deleted {
            return Err(ManagerError::Deleted(name.into()));
        }
        let Some(p) = entry.pending.clone() else {
            return Err(ManagerError::Refused(format!(
                "volume {name} is complete: there is nothing to resume"
            )));
        };
        match super::ondisk::read_header(&entry.backing, name) {
            Ok(l) if l.header.uuid_hex() == entry.uuid && !entry.uuid.is_empty() => {
                if l.header.incomplete {
                    return Ok((l.header, true));
                }
                entry.pending = None;
                self.save_entry(&entry)?;
                Ok((l.header, false))
            }
            // The header was never written: redo the creation on the same store (a grant made
            // for the lost key goes first).
            _ => {
                if let Some((key, id)) = entry.grant.take()
                    && let Err(e) = self.kms.retire_grant(&key, &id, &self.admin)
                {
                    tracing::warn!(volume = name, error = %e, "could not retire the grant of the interrupted creation");
                }
                let mut grant = None;
                match self.build(&mut entry, &mut grant) {
                    Ok(h) => Ok((h, p.preallocate)),
                    Err(e) => {
                        if let Some((key, id)) = grant {
                            let _ = self.kms.retire_grant(&key, &id, &self.admin);
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    /// Marks a finished preallocation: the header's `incomplete` flag and the entry's
    /// pending record go.
    pub(super) fn complete(&self, name: &str, store: &dyn Storage) -> Result<(), ManagerError> {
        update_header(store, name, Copies::Both, |h| {
            h.incomplete = false;
            h.progress = 0;
            Ok(true)
        })?;
        let mut entry = self.entry(name)?;
        entry.pending = None;
        self.save_entry(&entry)
    }
}
