//! Exports without a KMS: `--export name=…,file=…,key-file=…` specs, raw key files, `keygen`.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use zeroize::Zeroizing;

use super::serve::ServeError;
use crate::crypto::{self, BackendChoice, SectorSize, VolumeKey, XtsEngine};
use crate::server::Export;
use crate::storage::FileStorage;
use crate::volume::{EncryptedVolume, VolumeConfig};

/// One `--export` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Export name.
    pub name: String,
    /// Backing file or block device.
    pub file: PathBuf,
    /// Key file.
    pub key_file: PathBuf,
    /// Size in bytes, if given.
    pub size: Option<u64>,
    /// Sector size.
    pub sector_size: SectorSize,
    /// Discards (TRIM, BLOCK_STATUS) on.
    pub discards: bool,
    /// Read-only.
    pub read_only: bool,
    /// Description.
    pub description: String,
}

/// Parses `123`, `4K`, `512M`, `2G`, `1T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}"))
}

/// Parses a size in bytes that must fit in memory (`usize`).
pub fn parse_size_usize(s: &str) -> Result<usize, String> {
    usize::try_from(parse_size(s)?).map_err(|_| format!("size {s:?} is too large"))
}

/// Parses a sector size: 512, 1024, 2048 or 4096 (suffixes allowed: `4K`).
pub fn parse_sector_size(s: &str) -> Result<SectorSize, String> {
    SectorSize::from_bytes(parse_size(s)?).map_err(|e| e.to_string())
}

impl FromStr for ExportSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = ExportSpec {
            name: String::new(),
            file: PathBuf::new(),
            key_file: PathBuf::new(),
            size: None,
            sector_size: SectorSize::S4096,
            discards: false,
            read_only: false,
            description: String::new(),
        };
        for part in s.split(',') {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            match k {
                "name" => spec.name = v.to_owned(),
                "file" => spec.file = v.into(),
                "key-file" => spec.key_file = v.into(),
                "size" => spec.size = Some(parse_size(v)?),
                "sector-size" => {
                    spec.sector_size =
                        SectorSize::from_bytes(parse_size(v)?).map_err(|e| e.to_string())?
                }
                "discards" => spec.discards = true,
                "read-only" => spec.read_only = true,
                "description" => spec.description = v.to_owned(),
                other => return Err(format!("unknown export setting {other:?}")),
            }
        }
        if spec.name.is_empty()
            || spec.file.as_os_str().is_empty()
            || spec.key_file.as_os_str().is_empty()
        {
            return Err("an export needs name=, file= and key-file=".into());
        }
        if spec.name.len() > crate::codec::MAX_STRING {
            return Err("export name longer than 4096 bytes".into());
        }
        Ok(spec)
    }
}

/// Reads a key file: 64 raw bytes, or 128 hex digits with optional surrounding whitespace.
pub fn read_key_file(path: &Path) -> Result<VolumeKey, ServeError> {
    let fail = |reason: String| ServeError::KeyFile {
        path: path.to_owned(),
        reason,
    };
    let mut raw = Zeroizing::new(Vec::new());
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut raw))
        .map_err(|e| fail(e.to_string()))?;
    let mut key = Zeroizing::new(vec![0u8; crypto::VOLUME_KEY_BYTES]);
    if raw.len() == crypto::VOLUME_KEY_BYTES {
        key.copy_from_slice(&raw);
    } else {
        let text = std::str::from_utf8(&raw)
            .map_err(|_| fail("neither 64 raw bytes nor 128 hex digits".into()))?;
        if !crate::codec::hex_into(text.trim(), &mut key) {
            return Err(fail(format!(
                "holds {} bytes: neither 64 raw bytes nor 128 hex digits",
                raw.len()
            )));
        }
    }
    VolumeKey::take_from(&mut key).map_err(|e| fail(e.to_string()))
}

/// Opens one export: backing file, key, engine, volume.
pub fn open_export(spec: &ExportSpec, backend: BackendChoice) -> Result<Export, ServeError> {
    let key = read_key_file(&spec.key_file)?;
    let engine =
        XtsEngine::new(&key, spec.sector_size, backend).map_err(|source| ServeError::Crypto {
            export: spec.name.clone(),
            source,
        })?;
    drop(key);
    let backing = |source| ServeError::Backing {
        path: spec.file.clone(),
        source,
    };
    let storage =
        FileStorage::open(&spec.file, spec.size.unwrap_or(0), spec.read_only).map_err(backing)?;
    // One writer: a second server of the same file is refused (the lock goes with the
    // process). Read-only exports take no lock.
    if !spec.read_only
        && !crate::storage::Storage::lock(&storage, crate::storage::StoreLock::Serving, false)
            .map_err(backing)?
    {
        return Err(backing(std::io::Error::new(
            std::io::ErrorKind::ResourceBusy,
            "another nbdcrypt process serves this file (or a volume command is using it); one writer per store",
        )));
    }
    warn_if_managed(spec, &storage);
    let size = match spec.size {
        Some(s) => s,
        None => storage.len().map_err(backing)?,
    };
    let volume = EncryptedVolume::new(
        Box::new(storage),
        engine,
        VolumeConfig {
            size,
            sector_size: spec.sector_size,
            discards: spec.discards,
            read_only: spec.read_only,
            data_offset: 0,
        },
    )
    .map_err(|source| ServeError::Volume {
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

/// A raw `--export` over a managed volume's backing file would serve its header as data (and
/// let writes destroy it): say so.
fn warn_if_managed(spec: &ExportSpec, storage: &FileStorage) {
    let mut head = vec![0u8; 2 * crate::volume::header::HEADER_COPY_BYTES];
    if crate::storage::Storage::read_at(storage, &mut head, 0).is_err() {
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

/// `nbdcrypt keygen PATH`: 64 random bytes, mode 0600, refusing to overwrite.
pub fn keygen(path: &Path) -> Result<(), ServeError> {
    let fail = |reason: String| ServeError::KeyFile {
        path: path.to_owned(),
        reason,
    };
    let mut key = Zeroizing::new([0u8; crypto::VOLUME_KEY_BYTES]);
    loop {
        getrandom::fill(&mut key[..]).map_err(|e| fail(e.to_string()))?;
        if key[..32] != key[32..] {
            break;
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    f.write_all(&key[..])
        .and_then(|()| f.sync_all())
        .map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_spec_parses_every_setting() {
        let s: ExportSpec = "name=d,file=/tmp/x,key-file=/tmp/k,size=1G,sector-size=512,discards,read-only,description=hi"
            .parse()
            .unwrap();
        assert_eq!(s.size, Some(1 << 30));
        assert_eq!(s.sector_size, SectorSize::S512);
        assert!(s.discards && s.read_only);
        assert_eq!(s.description, "hi");
        assert!("name=d,file=/x".parse::<ExportSpec>().is_err());
        assert!(
            "name=d,file=/x,key-file=/k,colour=red"
                .parse::<ExportSpec>()
                .is_err()
        );
        assert!(
            "name=d,file=/x,key-file=/k,sector-size=3000"
                .parse::<ExportSpec>()
                .is_err()
        );
    }

    #[test]
    fn parse_size_handles_suffixes_and_overflow() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("12Q").is_err());
    }

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
