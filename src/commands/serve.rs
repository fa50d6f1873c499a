//! `nbdcrypt serve`: open the exports, bind, serve until SIGINT/SIGTERM, drain, flush.
//!
//! Until named volumes with KMS-wrapped keys exist, an export is a backing file plus a key file.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::cli::ServeArgs;
use crate::crypto::{self, BackendChoice, CryptoError, SectorSize, VolumeKey, XtsEngine};
use crate::server::{self, Export, Exports, Listen, Listener, ServerConfig};
use crate::storage::FileStorage;
use crate::volume::{EncryptedVolume, VolumeConfig, VolumeError};

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

/// Errors of `serve` and `keygen`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The key file could not be used.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// Path.
        path: PathBuf,
        /// Why (never key bytes).
        reason: String,
    },
    /// The backing file could not be opened.
    #[error("backing file {path}: {source}")]
    Backing {
        /// Path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
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
    /// Two exports share a name.
    #[error("two exports are named {0:?}")]
    DuplicateName(String),
    /// The server could not start.
    #[error(transparent)]
    Server(#[from] server::ServerError),
    /// A named volume could not be opened.
    #[error(transparent)]
    NamedVolume(#[from] crate::volume::manager::ManagerError),
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
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

/// The quick-start volume served when `serve` gets no `--volume` and no `--export`.
pub const QUICKSTART_VOLUME: &str = "scratch";
/// Its size when it has to be created.
pub const QUICKSTART_SIZE: u64 = 1 << 30;

/// Runs the server until SIGINT or SIGTERM.
pub fn run(
    args: ServeArgs,
    state_dir: &Path,
    kms: &dyn crate::kms::KeyService,
    kms_name: &str,
) -> Result<(), ServeError> {
    if !crypto::locked::disable_core_dumps() {
        tracing::warn!("could not mark the process undumpable (PR_SET_DUMPABLE)");
    }
    let mut list = Vec::new();
    let mut volumes = args.volumes.clone();
    if volumes.is_empty() && args.exports.is_empty() {
        volumes.push(QUICKSTART_VOLUME.into());
        let m = crate::volume::manager::Manager::new(state_dir, kms, kms_name);
        if matches!(
            m.entry(QUICKSTART_VOLUME),
            Err(crate::volume::manager::ManagerError::NoSuchVolume(_))
        ) {
            let h = m.create(
                QUICKSTART_VOLUME,
                &crate::volume::manager::CreateOptions {
                    size: QUICKSTART_SIZE,
                    volume_type: crate::volume::header::VolumeType::Scratch,
                    kms_key: None,
                    sector_size: SectorSize::S4096,
                    backing: None,
                    discards: false,
                },
            )?;
            tracing::info!(volume = h.name, size = h.size, state_dir = %state_dir.display(), "created the quick-start scratch volume on the local KMS");
        }
    }
    if !volumes.is_empty() {
        let m = crate::volume::manager::Manager::new(state_dir, kms, kms_name);
        for name in &volumes {
            if list.iter().any(|e: &Export| &e.name == name) {
                return Err(ServeError::DuplicateName(name.clone()));
            }
            // One Decrypt per volume per serve: the key is unwrapped here and only here.
            let volume = m.open(name, args.backend, false)?;
            tracing::info!(
                volume = name,
                size = volume.size(),
                crypto = volume.engine_summary(),
                "volume ready"
            );
            list.push(Export::new(
                name.clone(),
                format!("nbdcrypt volume {name}"),
                volume,
            ));
        }
    }
    for spec in &args.exports {
        if list.iter().any(|e: &Export| e.name == spec.name) {
            return Err(ServeError::DuplicateName(spec.name.clone()));
        }
        let export = open_export(spec, args.backend)?;
        tracing::info!(
            export = export.name,
            size = export.volume.size(),
            discards = spec.discards,
            read_only = spec.read_only,
            file = %spec.file.display(),
            crypto = export.volume.engine_summary(),
            "export ready"
        );
        list.push(export);
    }
    let exports = Exports::new(list);
    let config = ServerConfig {
        listen: match &args.unix {
            Some(p) => Listen::Unix(p.clone()),
            None => Listen::Tcp(args.listen),
        },
        max_connections: args.max_connections,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nbdcrypt")
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(async move {
        let listener = Listener::bind(&config.listen).await?;
        let addr = listener.describe();
        tracing::info!(listen = addr, "serving");
        let bound = match (&config.listen, listener.tcp_addr()) {
            (Listen::Tcp(_), Some(a)) => Listen::Tcp(a),
            (other, _) => other.clone(),
        };
        print_attach_help(&bound, &exports);
        if let Some(path) = &args.ready_file
            && let Err(e) = std::fs::write(path, format!("{addr}\n"))
        {
            tracing::warn!(error = %e, path = %path.display(), "could not write the ready file");
        }
        if !volumes.is_empty() {
            tokio::spawn(watch_deletions(
                exports.clone(),
                volumes.clone(),
                state_dir.to_owned(),
            ));
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: finishing in-flight requests");
            let _ = tx.send(true);
        });
        server::run(listener, exports, &config, rx).await;
        tracing::info!("stopped");
        Ok(())
    })
}

fn print_attach_help(listen: &Listen, exports: &Exports) {
    let mut err = std::io::stderr().lock();
    for e in exports.all() {
        let (uri, client) = match listen {
            Listen::Tcp(a) => (
                format!("nbd://{a}/{}", e.name),
                format!(
                    "nbd-client {} {} /dev/nbd0 -N {} -b 4096",
                    a.ip(),
                    a.port(),
                    e.name
                ),
            ),
            Listen::Unix(p) => (
                format!("nbd+unix:///{}?socket={}", e.name, p.display()),
                format!(
                    "nbd-client -unix {} /dev/nbd0 -N {} -b 4096",
                    p.display(),
                    e.name
                ),
            ),
        };
        let _ = writeln!(
            err,
            "serving {uri}\n  kernel:  {client}\n  nbdfuse: mkdir -p fuse && nbdfuse fuse/disk {uri} & losetup -f --show -b 4096 fuse/disk"
        );
    }
}

/// Withdraws served volumes that `volume delete` has tombstoned, and destroys their in-memory
/// keys once the last connection lets go: a deleted volume stops being served within a second.
async fn watch_deletions(exports: Exports, volumes: Vec<String>, state_dir: std::path::PathBuf) {
    let mut live = volumes;
    while !live.is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut still = Vec::new();
        for name in live {
            if !crate::volume::manager::is_deleted(&state_dir, &name) {
                still.push(name);
                continue;
            }
            let Some(export) = exports.withdraw(&name) else {
                continue;
            };
            tracing::warn!(volume = name, "volume deleted while served: withdrawing it");
            // Wait for its connections to end, then drop the last reference: the key schedules
            // are wiped as the volume is dropped.
            while Arc::strong_count(&export.volume) > 1 {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            drop(export);
            tracing::warn!(volume = name, "volume key destroyed in memory");
        }
        live = still;
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
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
