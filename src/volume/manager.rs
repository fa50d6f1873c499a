//! Named volumes: create, open (unwrap the key once), describe, delete (crypto-shred).
//!
//! A volume is a backing file (or device) that starts with the two header copies
//! ([`super::header`]) and a small registry entry `<state-dir>/volumes/<name>.json` that maps
//! the name to the backing path. The registry holds no key material and no wrapped key; after a
//! delete it keeps a tombstone so that a later `serve` can say the volume was deleted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::header::{self, DATA_OFFSET, Header, VolumeType};
use super::lease::{LeaseOptions, ServingLease};
use super::{EncryptedVolume, VolumeConfig};
use crate::crypto::{BackendChoice, SectorSize, VolumeKey, XtsEngine};
use crate::kms::{Caller, EncryptionContext, KeyService, KmsError, local::DEFAULT_ALIAS};
use crate::storage::Storage;

pub use super::ondisk::{
    Copies, Entry, ManagerError, Pending, is_deleted, read_header, read_header_from, update_header,
};
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

/// The volumes of one state directory, backed by one key service.
pub struct Manager<'k> {
    pub(super) state_dir: PathBuf,
    pub(super) kms: &'k dyn KeyService,
    pub(super) kms_name: String,
    /// The serving principal: data-key operations.
    pub(super) caller: Caller,
    /// The administrator: grants.
    pub(super) admin: Caller,
    /// How an upstream backing is used (timeout, connections).
    pub(super) upstream: crate::upstream::Options,
}

use crate::codec::to_hex as hex;

/// Moves an unwrapped data key into a [`VolumeKey`] (wiping `plain`), builds the engine, and
/// drops the key: only the engine's protected schedules remain. Returns the key-check value.
pub(super) fn engine_with_check(
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
            upstream: super::backing::DEFAULT_UPSTREAM,
        }
    }

    /// Uses upstream backings with `opts` (`serve --upstream-timeout`,
    /// `--upstream-connections`).
    #[must_use]
    pub fn with_upstream(mut self, opts: crate::upstream::Options) -> Self {
        self.upstream = opts;
        self
    }

    /// Opens the existing store `backing` (a path or an upstream URI; see [`super::backing`]).
    pub(super) fn open_backing(
        &self,
        backing: &Path,
        read_only: bool,
    ) -> Result<Arc<dyn Storage>, ManagerError> {
        super::backing::open(backing, read_only, &self.upstream)
            .map_err(io("cannot open the backing store", backing))
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub(super) fn registry(&self) -> PathBuf {
        crate::fsutil::StateLayout::new(&self.state_dir).registry()
    }

    fn entry_path(&self, name: &str) -> PathBuf {
        crate::fsutil::StateLayout::new(&self.state_dir).entry(name)
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

    pub(super) fn save_entry(&self, e: &Entry) -> Result<(), ManagerError> {
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

    /// Removes a registry entry (an unfinished creation that is rolled back).
    pub(super) fn remove_entry(&self, name: &str) -> Result<(), ManagerError> {
        let p = self.entry_path(name);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot remove", &p)(e)),
        }
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

    pub(super) fn context(uuid: &[u8; 16], name: &str) -> EncryptionContext {
        let mut c = EncryptionContext::single(CONTEXT_VOLUME_ID, &hex(uuid));
        c.0.insert(CONTEXT_VOLUME_NAME.into(), name.into());
        c
    }

    /// Creates the serving principal's grant on `key` if it is customer-managed.
    pub(super) fn grant_for(
        &self,
        key: &str,
        uuid: &[u8; 16],
    ) -> Result<Option<(String, String)>, KmsError> {
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
        let store = self.open_backing(&e.backing, true)?;
        let loaded = read_header_from(store.as_ref(), name).map_err(|err| err.at(&e.backing))?;
        if loaded.header.deleted {
            return Err(ManagerError::Deleted(name.into()));
        }
        Ok((e, loaded))
    }

    /// Opens the backing store of a live volume for writing (never creating it) and checks
    /// that it is as long as the header says the volume is.
    pub(super) fn open_store(
        &self,
        name: &str,
        read_only: bool,
    ) -> Result<(Entry, Arc<dyn Storage>, Header), ManagerError> {
        let (entry, loaded) = self.header(name)?;
        if let Some(problem) = &loaded.damaged {
            tracing::warn!(volume = name, %problem, "one header copy is damaged; using the other (it is rewritten on the next update)");
        }
        let store = self.open_backing(&entry.backing, read_only)?;
        let h = loaded.header;
        check_length(name, &entry.backing, store.as_ref(), h.size)?;
        Ok((entry, Arc::new(store), h))
    }

    /// One `Decrypt` of the header's wrapped key, checked against the key-check value; the
    /// engine keeps only the protected key schedules.
    pub(super) fn unwrap_engine(
        &self,
        name: &str,
        h: &Header,
        backend: BackendChoice,
    ) -> Result<XtsEngine, ManagerError> {
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
        if !crate::codec::ct_eq(&kcv, &h.key_check) {
            return Err(ManagerError::WrongKey(name.into()));
        }
        Ok(engine)
    }

    /// Opens a volume for serving: refuses an incomplete volume or a short backing store,
    /// takes the serving lease (refusing while another server holds it), then unwraps the key
    /// (one `Decrypt`). The lease goes to the caller, which renews and releases it.
    pub fn open(
        &self,
        name: &str,
        backend: BackendChoice,
        lease: LeaseOptions,
    ) -> Result<(EncryptedVolume, ServingLease), ManagerError> {
        let pending = self.entry(name)?.pending;
        if let Some(p) = pending {
            let done = self.header(name).map_or(0, |(_, l)| l.header.progress);
            return Err(ManagerError::Incomplete {
                volume: name.into(),
                done,
                size: p.size,
            });
        }
        let (entry, store, h) = self.open_store(name, false)?;
        if h.incomplete {
            return Err(ManagerError::Incomplete {
                volume: name.into(),
                done: h.progress,
                size: h.size,
            });
        }
        // A volume under re-encryption is refused by the lease, under the header lock.
        let held = ServingLease::acquire(Arc::clone(&store), name, lease)
            .map_err(|e| e.at(&entry.backing))?;
        match self.unwrap_engine(name, &h, backend).and_then(|engine| {
            self.volume_over(name, Box::new(Arc::clone(&store)), engine, &h, false)
        }) {
            Ok(v) => Ok((v, held)),
            Err(e) => {
                if let Err(release) = held.release() {
                    tracing::warn!(volume = name, error = %release, "could not release the lease");
                }
                Err(e)
            }
        }
    }

    /// Checks that `blob` (just made by the KMS) unwraps, under `key` and `context`, to a key
    /// that `matches` accepts; one `Decrypt` audited with purpose `verify-wrap`. Refuses
    /// otherwise, before any header holds the blob.
    pub(super) fn verify_wrap(
        &self,
        name: &str,
        key: &str,
        blob: &[u8],
        context: &EncryptionContext,
        matches: impl FnOnce(&[u8]) -> bool,
    ) -> Result<(), ManagerError> {
        let plain = self
            .kms
            .decrypt(key, blob, context, &self.caller.for_purpose("verify-wrap"))
            .map_err(|source| ManagerError::Kms {
                volume: name.into(),
                source,
            })?;
        if matches(&plain) {
            Ok(())
        } else {
            Err(ManagerError::Refused(format!(
                "volume {name}: the key service returned a wrapped key that does not unwrap to the data key; nothing was written"
            )))
        }
    }

    /// `serve --kms-recheck`: one `Decrypt` of the volume's current wrapped key (read from
    /// `store`, so a rewrap is followed), audited with purpose `recheck`. The unwrapped key is
    /// wiped at once; only the answer matters.
    pub fn recheck(&self, name: &str, store: &dyn Storage) -> Result<(), ManagerError> {
        let h = super::ondisk::read_header_from(store, name)?.header;
        if h.deleted {
            return Err(ManagerError::Deleted(name.into()));
        }
        let context = EncryptionContext(h.context.iter().cloned().collect());
        let plain = self
            .kms
            .decrypt(
                &h.key_id,
                &h.wrapped_key,
                &context,
                &self.caller.for_purpose("recheck"),
            )
            .map_err(|source| ManagerError::Kms {
                volume: name.into(),
                source,
            })?;
        drop(plain);
        Ok(())
    }

    /// The encrypted volume over `store` that the header describes.
    pub(super) fn volume_over(
        &self,
        name: &str,
        store: Box<dyn Storage>,
        engine: XtsEngine,
        h: &Header,
        read_only: bool,
    ) -> Result<EncryptedVolume, ManagerError> {
        EncryptedVolume::new(
            store,
            engine,
            VolumeConfig {
                size: h.size,
                sector_size: SectorSize::from_bytes(u64::from(h.sector_size)).map_err(
                    |source| ManagerError::Crypto {
                        volume: name.into(),
                        source,
                    },
                )?,
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
        let h = loaded.header;
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
        // The new blob must unwrap to the same data key (its key-check value) before it
        // replaces the old one in both header copies.
        let sector_size = SectorSize::from_bytes(u64::from(h.sector_size)).map_err(|source| {
            ManagerError::Crypto {
                volume: name.into(),
                source,
            }
        })?;
        self.verify_wrap(name, &arn, &blob, &context, |plain| {
            let mut copy = zeroize::Zeroizing::new(plain.to_vec());
            engine_with_check(name, &mut copy, sector_size, BackendChoice::Auto)
                .is_ok_and(|(_, kcv)| crate::codec::ct_eq(&kcv, &h.key_check))
        })?;
        let store = self.open_backing(&entry.backing, false)?;
        // Under the header lock, so a serving process's lease renewal cannot undo it; both
        // copies, so the blob under the old key survives in neither.
        let h = update_header(store.as_ref(), name, Copies::Both, |cur| {
            if cur.wrapped_key != h.wrapped_key {
                return Err(ManagerError::Refused(format!(
                    "volume {name}: its key was rewrapped by another command meanwhile; run rewrap again"
                )));
            }
            cur.wrapped_key = blob;
            cur.key_id = arn;
            Ok(true)
        })
        .map_err(|e| e.at(&entry.backing))?;
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
}

/// Refuses a backing store shorter than the header's volume size (plus the header area).
pub(super) fn check_length(
    name: &str,
    path: &Path,
    store: &dyn Storage,
    volume_size: u64,
) -> Result<(), ManagerError> {
    let actual = store.size().map_err(io("cannot find the size of", path))?;
    let needed = DATA_OFFSET.saturating_add(volume_size);
    if actual < needed {
        return Err(ManagerError::Short {
            volume: name.into(),
            path: path.to_owned(),
            actual,
            needed,
        });
    }
    Ok(())
}
