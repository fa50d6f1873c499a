//! `nbdcrypt benchmark`: in-memory XTS throughput per backend and sector size, in the spirit of
//! `cryptsetup benchmark`. No storage is touched; the figures are the crypto ceiling.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::cli::BenchmarkArgs;
use crate::crypto::{
    BackendChoice, BackendKind, CryptoError, SectorIndex, SectorSize, VolumeKey, XtsEngine,
};

/// One measured line.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Backend measured.
    pub backend: BackendKind,
    /// Sector size.
    pub sector_size: SectorSize,
    /// Encryption throughput, bytes per second.
    pub encrypt_bytes_per_sec: f64,
    /// Decryption throughput, bytes per second.
    pub decrypt_bytes_per_sec: f64,
}

/// Errors of the benchmark command.
#[derive(Debug, thiserror::Error)]
pub enum BenchmarkError {
    /// The crypto layer refused.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// Writing the report failed.
    #[error("could not write the report: {0}")]
    Io(#[from] std::io::Error),
    /// The request size is not usable.
    #[error("request size {0} must be a positive multiple of 4096")]
    RequestSize(usize),
}

/// Times `op` over `buf` until `budget` has passed; returns bytes per second.
fn throughput(
    budget: Duration,
    bytes: usize,
    mut op: impl FnMut() -> Result<(), CryptoError>,
) -> Result<f64, CryptoError> {
    // Warm up caches and the pool of backend contexts.
    op()?;
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget || calls == 0 {
        op()?;
        calls += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(calls as f64 * bytes as f64 / secs)
}

/// Measures every requested backend at every sector size.
pub fn measure(args: &BenchmarkArgs) -> Result<Vec<Measurement>, BenchmarkError> {
    if args.request_bytes == 0 || !args.request_bytes.is_multiple_of(4096) {
        return Err(BenchmarkError::RequestSize(args.request_bytes));
    }
    let budget = Duration::from_secs_f64(args.seconds.max(0.01));
    let backends: Vec<BackendKind> = match args.backend {
        None | Some(BackendChoice::Auto) => BackendKind::available(),
        Some(BackendChoice::Force(k)) => vec![k],
    };
    let key = VolumeKey::generate()?;
    let mut buf = vec![0x5Au8; args.request_bytes];
    let mut results = Vec::new();
    let bar = super::progress::steps(
        (backends.len() * SectorSize::ALL.len()) as u64,
        "benchmarking",
    );
    for backend in backends {
        for sector_size in SectorSize::ALL {
            bar.set_message(format!(
                "benchmarking {} {}",
                backend.name(),
                sector_size.bytes()
            ));
            let engine = XtsEngine::new(&key, sector_size, BackendChoice::Force(backend))?;
            let first = SectorIndex(1 << 33);
            let enc = throughput(budget, buf.len(), || {
                engine.encrypt_sectors(first, &mut buf)
            })?;
            let dec = throughput(budget, buf.len(), || {
                engine.decrypt_sectors(first, &mut buf)
            })?;
            results.push(Measurement {
                backend,
                sector_size,
                encrypt_bytes_per_sec: enc,
                decrypt_bytes_per_sec: dec,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(results)
}

/// Runs the benchmark and prints a table.
pub fn run(args: &BenchmarkArgs, out: &mut impl Write) -> Result<(), BenchmarkError> {
    writeln!(
        out,
        "# In-memory XTS-AES-256 throughput, one thread, {} KiB per call (no storage I/O).",
        args.request_bytes / 1024
    )?;
    writeln!(
        out,
        "#  Algorithm |  Key |  Backend | Sector |  Encryption |  Decryption | Path"
    )?;
    for m in measure(args)? {
        writeln!(
            out,
            "     aes-xts   512b {:>9} {:>7}b {:>8.1} MiB/s {:>8.1} MiB/s   {}",
            m.backend.name(),
            m.sector_size.bytes(),
            m.encrypt_bytes_per_sec / (1024.0 * 1024.0),
            m.decrypt_bytes_per_sec / (1024.0 * 1024.0),
            m.backend.path(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmark_reports_every_backend_and_sector_size() {
        let args = BenchmarkArgs {
            request_bytes: 8192,
            seconds: 0.001,
            backend: None,
        };
        let mut out = Vec::new();
        run(&args, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for kind in BackendKind::available() {
            for size in SectorSize::ALL {
                let line = text.lines().find(|l| {
                    l.contains(&format!(" {} ", kind.name()))
                        && l.contains(&format!(" {}b ", size.bytes()))
                });
                assert!(line.is_some(), "missing {kind} {size}:\n{text}");
            }
        }
    }

    #[test]
    fn benchmark_bad_request_size_is_refused() {
        let args = BenchmarkArgs {
            request_bytes: 1000,
            seconds: 0.001,
            backend: None,
        };
        assert!(matches!(
            measure(&args),
            Err(BenchmarkError::RequestSize(1000))
        ));
    }
}
