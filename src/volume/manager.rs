//! Named volumes: create, open (unwrap the key once), describe, delete (crypto-shred).
//!
//! A volume is a backing file (or device) that starts with the two header copies
//! ([`super::header`]) and a small registry entry `<state-dir>/volumes/<name>.json` that maps
//! the name to the backing path. The registry holds no key material and no wrapped key; after a
//! delete it keeps a tombstone so that a later `serve` can say the volume was deleted.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::header::{self, DATA_OFFSET, HEADER_COPIES, HEADER_COPY_BYTES, Header, VolumeType};
use super::{EncryptedVolume, VolumeConfig};
use crate::crypto::{self, BackendChoice, SectorSize, VolumeKey, XtsEngine};
use crate::kms::{Caller, EncryptionContext, KeyService, KmsError, local::DEFAULT_ALIAS};
use crate::storage::FileStorage;

pub use super::ondisk::{Entry, ManagerError, is_deleted, read_header, write_header};
use super::ondisk::{check_name, io};
pub use crate::kms::{CONTEXT_VOLUME_ID, CONTEXT_VOLUME_NAME};

/// Operations the serving principal's grant allows on a customer-managed key.
pub const GRANT_OPERATIONS: [&str; 5] = [
    "Decrypt",
    "GenerateDataKey",
    "ReEncryptFrom",
    "ReEncryptTo",
    "DescribeKey",
];

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
}

/// The volumes of one state directory, backed by one key service.
pub struct Manager<'k> {
    state_dir: PathBuf,
    kms: &'k dyn KeyService,
    kms_name: String,
    /// The serving principal: data-key operations.
    caller: Caller,
    /// The administrator: grants.
    admin: Caller,
}

use crate::codec::to_hex as hex;

/// Moves an unwrapped data key into a [`VolumeKey`] (wiping `plain`), builds the engine, and
/// drops the key: only the engine's protected schedules remain. Returns the key-check value.
fn engine_with_check(
    volume: &str,
    plain: &mut [u8],
    sector_size: SectorSize,
    backend: BackendChoice,
) -> Result<(XtsEngine, [u8; 32]), ManagerError> {
    let crypto_err = |source| ManagerError::Crypto {
        volume: volume.into(),
        source,
    };
    let key = VolumeKey::take_from(plain).map_err(crypto_err)?;
    let engine = XtsEngine::new(&key, sector_size, backend).map_err(crypto_err)?;
    drop(key);
    let kcv = engine.key_check_value().map_err(crypto_err)?;
    Ok((engine, kcv))
}

impl<'k> Manager<'k> {
    /// Volumes under `state_dir`, keys from `kms` (named `kms_name` in headers).
    pub fn new(state_dir: &Path, kms: &'k dyn KeyService, kms_name: &str) -> Self {
        Manager {
            state_dir: state_dir.to_owned(),
            kms,
            kms_name: kms_name.to_owned(),
            caller: Caller::local_service(),
            admin: Caller::local_admin(),
        }
    }

    fn registry(&self) -> PathBuf {
        self.state_dir.join("volumes")
    }

    fn entry_path(&self, name: &str) -> PathBuf {
        self.registry().join(format!("{name}.json"))
    }

    /// The registry entry of `name`.
    pub fn entry(&self, name: &str) -> Result<Entry, ManagerError> {
        check_name(name)?;
        let p = self.entry_path(name);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManagerError::NoSuchVolume(name.into()));
            }
            Err(e) => return Err(io("cannot read", &p)(e)),
        };
        serde_json::from_str(&text)
            .map_err(|e| io("corrupt registry entry", &p)(std::io::Error::other(e)))
    }

    fn save_entry(&self, e: &Entry) -> Result<(), ManagerError> {
        let dir = self.registry();
        crate::fsutil::create_private_dir(&dir).map_err(io("cannot create", &dir))?;
        let p = self.entry_path(&e.name);
        let tmp = dir.join(format!(".{}.tmp", e.name));
        let text = serde_json::to_vec_pretty(e)
            .map_err(|e| io("cannot encode", &p)(std::io::Error::other(e)))?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &p))
            .map_err(io("cannot write", &p))
    }

    /// All registry entries, by name.
    pub fn list(&self) -> Result<Vec<Entry>, ManagerError> {
        let dir = self.registry();
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io("cannot list", &dir)(e)),
        };
        for f in rd.flatten() {
            let n = f.file_name().to_string_lossy().into_owned();
            if let Some(name) = n.strip_suffix(".json")
                && !name.starts_with('.')
            {
                out.push(self.entry(name)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn context(uuid: &[u8; 16], name: &str) -> EncryptionContext {
        let mut c = EncryptionContext::single(CONTEXT_VOLUME_ID, &hex(uuid));
        c.0.insert(CONTEXT_VOLUME_NAME.into(), name.into());
        c
    }

    /// `volume create`: a new data key from `GenerateDataKey`, a header, an empty data area.
    pub fn create(&self, name: &str, opts: &CreateOptions) -> Result<Header, ManagerError> {
        check_name(name)?;
        match self.entry(name) {
            Ok(e) if !e.deleted => return Err(ManagerError::Exists(name.into())),
            Ok(_) | Err(ManagerError::NoSuchVolume(_)) => {}
            Err(e) => return Err(e),
        }
        let sector = opts.sector_size.bytes() as u64;
        if opts.size == 0 || !opts.size.is_multiple_of(sector) {
            return Err(ManagerError::Refused(format!(
                "size {} is not a positive multiple of the {sector}-byte sector size",
                opts.size
            )));
        }
        let key_id = match (opts.volume_type, &opts.kms_key) {
            (VolumeType::Scratch, Some(_)) => {
                return Err(ManagerError::Refused(
                    "scratch volumes always use the service-managed default key; --kms-key is for persistent volumes".into(),
                ));
            }
            (VolumeType::Scratch, None) | (VolumeType::Persistent, None) => {
                DEFAULT_ALIAS.to_owned()
            }
            (VolumeType::Persistent, Some(k)) => k.clone(),
        };
        let mut uuid = [0u8; 16];
        getrandom::fill(&mut uuid).map_err(|e| ManagerError::Refused(e.to_string()))?;
        let context = Self::context(&uuid, name);
        let kms_err = |source| ManagerError::Kms {
            volume: name.into(),
            source,
        };
        // A customer-managed key: the administrator grants the serving principal what it needs,
        // for this volume's context only (as FSx does for persistent file systems).
        let grant = self.grant_for(&key_id, &uuid).map_err(kms_err)?;
        let mut dk = self
            .kms
            .generate_data_key(&key_id, crypto::VOLUME_KEY_BYTES, &context, &self.caller)
            .map_err(kms_err)?;
        let (_engine, key_check) = engine_with_check(
            name,
            &mut dk.plaintext,
            opts.sector_size,
            BackendChoice::Auto,
        )?;
        let backing = opts
            .backing
            .clone()
            .unwrap_or_else(|| self.registry().join(format!("{name}.img")));
        if let Some(parent) = backing.parent() {
            crate::fsutil::create_private_dir(parent).map_err(io("cannot create", parent))?;
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&backing)
            .map_err(io("cannot create the backing file", &backing))?;
        let meta = f.metadata().map_err(io("cannot stat", &backing))?;
        if meta.is_file() && meta.len() < DATA_OFFSET + opts.size {
            f.set_len(DATA_OFFSET + opts.size)
                .map_err(io("cannot size", &backing))?;
        }
        // A reused file must not show old data: zero the header area.
        f.write_all_at(&vec![0u8; DATA_OFFSET as usize], 0)
            .map_err(io("cannot initialise", &backing))?;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut h = Header {
            sequence: 1,
            uuid,
            name: name.into(),
            volume_type: opts.volume_type,
            size: opts.size,
            sector_size: u16::try_from(opts.sector_size.bytes()).unwrap_or(4096),
            discards: opts.discards,
            deleted: false,
            created,
            kms: self.kms_name.clone(),
            key_id: dk.key_arn.clone(),
            wrapped_key: dk.blob.clone(),
            context: context
                .0
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            key_check,
        };
        write_header(&backing, &h, 0)?;
        h.sequence = 2;
        write_header(&backing, &h, 1)?;
        self.save_entry(&Entry {
            name: name.into(),
            backing,
            uuid: hex(&uuid),
            deleted: false,
            grant,
        })?;
        Ok(h)
    }

    /// Creates the serving principal's grant on `key` if it is customer-managed.
    fn grant_for(&self, key: &str, uuid: &[u8; 16]) -> Result<Option<(String, String)>, KmsError> {
        // The service default key needs no grant (its policy admits the service); a key
        // service without a serving principal creates none.
        let Some(grantee) = self.kms.serving_principal() else {
            return Ok(None);
        };
        if key == DEFAULT_ALIAS {
            return Ok(None);
        }
        let md = self
            .kms
            .describe_key(key, &self.admin)
            .or_else(|_| self.kms.describe_key(key, &self.caller))?;
        if md.manager != crate::kms::KeyManager::Customer {
            return Ok(None);
        }
        let subset = EncryptionContext::single(CONTEXT_VOLUME_ID, &hex(uuid));
        let id =
            self.kms
                .create_grant(&md.arn, &grantee, &GRANT_OPERATIONS, &subset, &self.admin)?;
        Ok(Some((md.arn, id)))
    }

    /// The live header of `name` (refuses deleted volumes).
    pub fn header(&self, name: &str) -> Result<(Entry, header::Loaded), ManagerError> {
        let e = self.entry(name)?;
        if e.deleted {
            return Err(ManagerError::Deleted(name.into()));
        }
        let loaded = read_header(&e.backing, name)?;
        if loaded.header.deleted {
            return Err(ManagerError::Deleted(name.into()));
        }
        Ok((e, loaded))
    }

    /// Unwraps the volume's key (one `Decrypt`) and opens it for serving.
    pub fn open(
        &self,
        name: &str,
        backend: BackendChoice,
        read_only: bool,
    ) -> Result<EncryptedVolume, ManagerError> {
        let (entry, loaded) = self.header(name)?;
        if let Some(problem) = &loaded.damaged {
            tracing::warn!(volume = name, %problem, "one header copy is damaged; using the other (it is rewritten on the next update)");
        }
        let h = loaded.header;
        let sector_size = SectorSize::from_bytes(u64::from(h.sector_size)).map_err(|source| {
            ManagerError::Crypto {
                volume: name.into(),
                source,
            }
        })?;
        let context = EncryptionContext(h.context.iter().cloned().collect());
        let mut plain = self
            .kms
            .decrypt(&h.key_id, &h.wrapped_key, &context, &self.caller)
            .map_err(|source| ManagerError::Kms {
                volume: name.into(),
                source,
            })?;
        let (engine, kcv) = engine_with_check(name, &mut plain, sector_size, backend)?;
        // Constant-time comparison: no timing hint about how close a wrong key came.
        if kcv
            .iter()
            .zip(h.key_check.iter())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            != 0
        {
            return Err(ManagerError::WrongKey(name.into()));
        }
        let storage = FileStorage::open(&entry.backing, 0, read_only)
            .map_err(io("cannot open", &entry.backing))?;
        EncryptedVolume::new(
            Box::new(storage),
            engine,
            VolumeConfig {
                size: h.size,
                sector_size,
                discards: h.discards,
                read_only,
                data_offset: DATA_OFFSET,
            },
        )
        .map_err(|source| ManagerError::Volume {
            volume: name.into(),
            source,
        })
    }

    /// `volume rewrap`: `ReEncrypt` of the wrapped key under `new_key`; both header copies are
    /// rewritten (older first), no data is touched and the plaintext key never leaves the KMS.
    pub fn rewrap(&self, name: &str, new_key: &str) -> Result<Header, ManagerError> {
        let (mut entry, loaded) = self.header(name)?;
        let mut h = loaded.header;
        if h.volume_type == VolumeType::Scratch {
            return Err(ManagerError::Refused(format!(
                "volume {name} is a scratch volume: its key is service-managed and cannot be moved to another KMS key"
            )));
        }
        let context = EncryptionContext(h.context.iter().cloned().collect());
        let kms_err = |source| ManagerError::Kms {
            volume: name.into(),
            source,
        };
        let new_grant = self.grant_for(new_key, &h.uuid).map_err(kms_err)?;
        let (blob, arn) = self
            .kms
            .re_encrypt(&h.key_id, new_key, &h.wrapped_key, &context, &self.caller)
            .map_err(kms_err)?;
        h.wrapped_key = blob;
        h.key_id = arn;
        let first = header::next_slot(loaded.slot);
        h.sequence += 1;
        write_header(&entry.backing, &h, first)?;
        h.sequence += 1;
        write_header(&entry.backing, &h, loaded.slot)?;
        if let Some((key, id)) = entry.grant.take()
            && let Err(e) = self.kms.retire_grant(&key, &id, &self.admin)
        {
            tracing::warn!(volume = name, error = %e, "could not retire the grant on the previous key");
        }
        entry.grant = new_grant;
        self.save_entry(&entry)?;
        Ok(h)
    }

    /// `volume export-key`: the plaintext key as 128 hex digits (persistent volumes only; one
    /// audited `Decrypt`).
    pub fn export_key(&self, name: &str) -> Result<zeroize::Zeroizing<String>, ManagerError> {
        let (_, loaded) = self.header(name)?;
        let h = loaded.header;
        if h.volume_type == VolumeType::Scratch {
            return Err(ManagerError::Refused(format!(
                "volume {name} is a scratch volume: its service-managed key is never shown"
            )));
        }
        let context = EncryptionContext(h.context.iter().cloned().collect());
        let plain = self
            .kms
            .decrypt(&h.key_id, &h.wrapped_key, &context, &self.caller)
            .map_err(|source| ManagerError::Kms {
                volume: name.into(),
                source,
            })?;
        Ok(zeroize::Zeroizing::new(hex(&plain)))
    }

    /// `volume delete`: destroys the wrapped key in both header copies (crypto-shredding),
    /// leaves a tombstone, and removes the backing file unless `keep_ciphertext`.
    pub fn delete(&self, name: &str, keep_ciphertext: bool) -> Result<(), ManagerError> {
        let mut entry = self.entry(name)?;
        if entry.deleted {
            return Err(ManagerError::Deleted(name.into()));
        }
        match read_header(&entry.backing, name) {
            Ok(loaded) => {
                let mut h = loaded.header;
                h.deleted = true;
                h.wrapped_key.clear();
                h.key_check = [0; 32];
                // Both copies, newest last: no copy of the blob survives either way.
                let first = header::next_slot(loaded.slot);
                h.sequence += 1;
                write_header(&entry.backing, &h, first)?;
                h.sequence += 1;
                write_header(&entry.backing, &h, loaded.slot)?;
            }
            Err(ManagerError::Io { .. }) if !entry.backing.exists() => {}
            Err(e) => {
                // Unreadable headers: overwrite both slots with zeroes rather than keep them.
                tracing::warn!(volume = name, error = %e, "headers unreadable; wiping both header slots");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&entry.backing)
                    .map_err(io("cannot open", &entry.backing))?;
                f.write_all_at(&vec![0u8; HEADER_COPY_BYTES * HEADER_COPIES], 0)
                    .and_then(|()| f.sync_data())
                    .map_err(io("cannot wipe the header of", &entry.backing))?;
            }
        }
        if let Some((key, id)) = entry.grant.take()
            && let Err(e) = self.kms.retire_grant(&key, &id, &self.admin)
        {
            tracing::warn!(volume = name, error = %e, "could not retire the serving grant; revoke it with `nbdcrypt kms revoke-grant`");
        }
        if !keep_ciphertext && entry.backing.is_file() {
            std::fs::remove_file(&entry.backing).map_err(io("cannot remove", &entry.backing))?;
        }
        entry.deleted = true;
        self.save_entry(&entry)
    }
}
