//! Exports without a KMS: `--export name=…,file=…,key-file=…` (the spec is parsed by
//! [`crate::cli::values`]), raw key files, `keygen`.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

pub use crate::cli::values::ExportSpec;
use crate::crypto::{self, BackendChoice, CryptoError, VolumeKey, XtsEngine};
use crate::server::Export;
use crate::storage::{FileStorage, Storage};
use crate::upstream::{NbdStore, UpstreamError};
use crate::volume::VolumeError;
use crate::volume::{EncryptedVolume, VolumeConfig};

/// What went wrong opening an `--export` or writing a key file.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The key file could not be used.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// Path.
        path: PathBuf,
        /// Why (never key bytes).
        reason: KeyFileProblem,
    },
    /// The backing file could not be opened.
    #[error("backing file {path}: {source}")]
    Backing {
        /// Path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The upstream NBD export could not be used.
    #[error("export {export}: {source}")]
    Upstream {
        /// Export.
        export: String,
        /// Why (names the upstream).
        source: UpstreamError,
    },
    /// The upstream cannot hold what the export asks for.
    #[error("export {export}: upstream {upstream} {problem}")]
    UpstreamUnfit {
        /// Export.
        export: String,
        /// The upstream's URI.
        upstream: String,
        /// What does not fit.
        problem: String,
    },
    /// The crypto engine refused.
    #[error("export {export}: {source}")]
    Crypto {
        /// Export.
        export: String,
        /// Why.
        source: CryptoError,
    },
    /// The volume refused its configuration.
    #[error("export {export}: {source}")]
    Volume {
        /// Export.
        export: String,
        /// Why.
        source: VolumeError,
    },
}

/// Why a key file is unusable (never its bytes).
#[derive(Debug, thiserror::Error)]
pub enum KeyFileProblem {
    /// It cannot be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// It is neither 64 raw bytes nor 128 hex digits.
    #[error("holds {0} bytes: neither 64 raw bytes nor 128 hex digits")]
    Format(usize),
    /// The key itself is refused (equal halves).
    #[error(transparent)]
    Key(#[from] CryptoError),
}

/// Reads a key file: 64 raw bytes, or 128 hex digits with optional surrounding whitespace.
pub fn read_key_file(path: &Path) -> Result<VolumeKey, ExportError> {
    let fail = |reason: KeyFileProblem| ExportError::KeyFile {
        path: path.to_owned(),
        reason,
    };
    let mut raw = Zeroizing::new(Vec::new());
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut raw))
        .map_err(|e| fail(e.into()))?;
    let mut key = Zeroizing::new(vec![0u8; crypto::VOLUME_KEY_BYTES]);
    if raw.len() == crypto::VOLUME_KEY_BYTES {
        key.copy_from_slice(&raw);
    } else {
        let hex_ok = std::str::from_utf8(&raw)
            .is_ok_and(|text| crate::codec::hex_into(text.trim(), &mut key));
        if !hex_ok {
            return Err(fail(KeyFileProblem::Format(raw.len())));
        }
    }
    VolumeKey::take_from(&mut key).map_err(|e| fail(e.into()))
}

/// Opens one export: backing file (or upstream, waited for up to `upstream_timeout` when it is
/// lost), key, engine, volume.
pub fn open_export(
    spec: &ExportSpec,
    backend: BackendChoice,
    upstream: &crate::upstream::Options,
) -> Result<Export, ExportError> {
    let key = read_key_file(&spec.key_file)?;
    let engine =
        XtsEngine::new(&key, spec.sector_size, backend).map_err(|source| ExportError::Crypto {
            export: spec.name.clone(),
            source,
        })?;
    drop(key);
    let (storage, size) = match spec.file.to_str().filter(|f| crate::upstream::is_uri(f)) {
        Some(uri) => open_upstream(spec, uri, upstream)?,
        None => open_file(spec)?,
    };
    warn_if_managed(spec, storage.as_ref());
    let volume = EncryptedVolume::new(
        storage,
        engine,
        VolumeConfig {
            size,
            sector_size: spec.sector_size,
            discards: spec.discards,
            read_only: spec.read_only,
            data_offset: 0,
        },
    )
    .map_err(|source| ExportError::Volume {
        export: spec.name.clone(),
        source,
    })?;
    Ok(Export::new(
        spec.name.clone(),
        if spec.description.is_empty() {
            format!("nbdcrypt aes-xts-plain64 volume {}", spec.name)
        } else {
            spec.description.clone()
        },
        volume,
    ))
}

/// The backing file or device of an export, locked for one writer, and the export's size.
fn open_file(spec: &ExportSpec) -> Result<(Box<dyn Storage>, u64), ExportError> {
    let backing = |source| ExportError::Backing {
        path: spec.file.clone(),
        source,
    };
    let storage =
        FileStorage::open(&spec.file, spec.size.unwrap_or(0), spec.read_only).map_err(backing)?;
    // One writer: a second server of the same file is refused (the lock goes with the
    // process). Read-only exports take no lock.
    if !spec.read_only
        && !storage
            .lock(crate::storage::StoreLock::Serving, false)
            .map_err(backing)?
    {
        return Err(backing(std::io::Error::new(
            std::io::ErrorKind::ResourceBusy,
            "another nbdcrypt process serves this file (or a volume command is using it); one writer per store",
        )));
    }
    let size = match spec.size {
        Some(s) => s,
        None => storage.len().map_err(backing)?,
    };
    Ok((Box::new(storage), size))
}

/// An upstream NBD export (`file=nbd://…` or `file=nbd+unix://…`) as the backing store: the
/// export's size is the upstream's unless `size=` asks for less. Nothing can lock an NBD
/// export, so one writer per store is the operator's to keep (managed volumes keep it with
/// their header lease).
fn open_upstream(
    spec: &ExportSpec,
    uri: &str,
    upstream: &crate::upstream::Options,
) -> Result<(Box<dyn Storage>, u64), ExportError> {
    let store = NbdStore::open_with(uri, upstream).map_err(|source| ExportError::Upstream {
        export: spec.name.clone(),
        source,
    })?;
    let info = store.info();
    let unfit = |problem: String| ExportError::UpstreamUnfit {
        export: spec.name.clone(),
        upstream: uri.to_owned(),
        problem,
    };
    let size = spec.size.unwrap_or(info.size);
    if size > info.size {
        return Err(unfit(format!(
            "holds {} bytes; size= asks for {size}",
            info.size
        )));
    }
    if info.has(crate::protocol::consts::flag::READ_ONLY) && !spec.read_only {
        return Err(unfit(
            "is read-only; add read-only to the export to serve it so".into(),
        ));
    }
    if u64::from(info.min_block) > spec.sector_size.bytes() as u64 {
        return Err(unfit(format!(
            "needs requests aligned to {} bytes, more than the {}-byte sectors",
            info.min_block,
            spec.sector_size.bytes()
        )));
    }
    tracing::info!(
        export = spec.name,
        upstream = uri,
        size,
        max_payload = info.max_payload,
        connections = store.connections(),
        "backing store is an upstream NBD export"
    );
    Ok((Box::new(store), size))
}

/// A raw `--export` over a managed volume's backing file would serve its header as data (and
/// let writes destroy it): say so.
fn warn_if_managed(spec: &ExportSpec, storage: &dyn Storage) {
    let mut head = vec![0u8; 2 * crate::volume::header::HEADER_COPY_BYTES];
    if storage.read_at(&mut head, 0).is_err() {
        return;
    }
    if let crate::volume::probe::Found::Nbdcrypt { name, .. } =
        crate::volume::probe::examine(&head, &[])
    {
        tracing::warn!(
            export = spec.name,
            file = %spec.file.display(),
            volume = name,
            "this file is a managed nbdcrypt volume: a raw --export serves its header and key \
             area as data, and writes through it destroy the volume; serve it with \
             `nbdcrypt serve --volume NAME` (after `nbdcrypt volume import NAME --backing FILE` \
             if it is not registered here)"
        );
    }
}

/// `nbdcrypt keygen PATH`: a fresh key made in locked memory ([`VolumeKey::generate`]: random,
/// distinct halves), written mode 0600, refusing to overwrite.
pub fn keygen(path: &Path) -> Result<(), ExportError> {
    let fail = |reason: KeyFileProblem| ExportError::KeyFile {
        path: path.to_owned(),
        reason,
    };
    let key = VolumeKey::generate().map_err(|e| fail(e.into()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| fail(e.into()))?;
    f.write_all(key.expose())
        .and_then(|()| f.sync_all())
        .map_err(|e| fail(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_accepts_raw_and_hex_and_refuses_garbage() {
        let dir = std::env::temp_dir().join(format!("nbdcrypt-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let raw: Vec<u8> = (0..64u8).collect();
        std::fs::write(dir.join("raw"), &raw).unwrap();
        assert!(read_key_file(&dir.join("raw")).is_ok());
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.join("hex"), format!("{hex}\n")).unwrap();
        assert!(read_key_file(&dir.join("hex")).is_ok());
        std::fs::write(dir.join("bad"), "not a key").unwrap();
        let err = read_key_file(&dir.join("bad")).unwrap_err().to_string();
        assert!(err.contains("neither 64 raw bytes"), "{err}");
        keygen(&dir.join("new")).unwrap();
        assert_eq!(std::fs::read(dir.join("new")).unwrap().len(), 64);
        assert!(
            keygen(&dir.join("new")).is_err(),
            "keygen must not overwrite"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
