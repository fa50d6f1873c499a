//! Shared by the fuzz targets: one runtime and one export over an in-memory volume.
// Each target includes this file and uses part of it.
#![allow(dead_code)]

use std::sync::OnceLock;

use nbdcrypt::crypto::{BackendChoice, SectorSize, VolumeKey, XtsEngine};
use nbdcrypt::server::{Export, Exports};
use nbdcrypt::storage::MemoryStorage;
use nbdcrypt::volume::{EncryptedVolume, VolumeConfig};

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

/// A fresh 1 MiB volume with 512-byte sectors (discards on, so TRIM and BLOCK_STATUS run).
pub fn volume() -> EncryptedVolume {
    // A fixed test key: fuzzing needs no secrecy, and a fixed key keeps runs reproducible.
    let mut raw: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let key = VolumeKey::take_from(&mut raw).expect("key");
    let sector = SectorSize::from_bytes(512).expect("sector");
    let engine = XtsEngine::new(&key, sector, BackendChoice::Auto).expect("engine");
    EncryptedVolume::new(
        Box::new(MemoryStorage::new(0)),
        engine,
        VolumeConfig {
            size: 1 << 20,
            sector_size: sector,
            discards: true,
            read_only: false,
            data_offset: 0,
        },
    )
    .expect("volume")
}

pub fn exports() -> Exports {
    static EXPORTS: OnceLock<Exports> = OnceLock::new();
    EXPORTS
        .get_or_init(|| {
            Exports::new(vec![
                Export::new("fuzz".into(), "fuzzed export".into(), volume()),
                Export::new("second".into(), String::new(), volume()),
            ])
        })
        .clone()
}

/// Runs `fut` against a client that sends `input` and then closes its side; the server's
/// output is drained so it never blocks on a full pipe.
pub fn drive<F, Fut>(input: &[u8], fut: F)
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let input = input.to_vec();
    runtime().block_on(async move {
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let feed = async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let drain = async move {
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let serve = async move {
            fut(server).await;
        };
        // A hung server would show up as a libFuzzer timeout.
        tokio::join!(feed, drain, serve);
    });
}
