//! Command-line grammar. Definitions only: behaviour lives in [`crate::commands`].

use clap::{Args, Parser, Subcommand};

use crate::crypto::BackendChoice;

/// An NBD server whose every volume is encrypted with XTS-AES-256 (aes-xts-plain64).
#[derive(Debug, Parser)]
#[command(name = "nbdcrypt", version, about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax); `NBDCRYPT_LOG` overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the CPU's AES features and the XTS backend that would be used.
    Info(InfoArgs),
    /// Measure XTS encrypt/decrypt throughput per backend and sector size (like
    /// `cryptsetup benchmark`).
    Benchmark(BenchmarkArgs),
}

/// `nbdcrypt info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Backend selection to report on: auto, hw or portable.
    #[arg(long, env = "NBDCRYPT_XTS_BACKEND", default_value = "auto")]
    pub backend: BackendChoice,
}

/// `nbdcrypt benchmark`.
#[derive(Debug, Args)]
pub struct BenchmarkArgs {
    /// Bytes per measured call (one request's worth of sectors).
    #[arg(long, default_value_t = 1024 * 1024)]
    pub request_bytes: usize,
    /// Seconds spent on each measurement.
    #[arg(long, default_value_t = 0.5)]
    pub seconds: f64,
    /// Only this backend (default: every backend).
    #[arg(long)]
    pub backend: Option<BackendChoice>,
}
