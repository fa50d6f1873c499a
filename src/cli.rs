//! Command-line grammar. Definitions only: behaviour lives in [`crate::commands`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::commands::serve::ExportSpec;
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
    /// Serve encrypted exports over NBD.
    Serve(ServeArgs),
    /// Write a fresh random 512-bit volume key to a file (mode 0600), for `serve --export`.
    Keygen(KeygenArgs),
}

/// `nbdcrypt serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TCP address to listen on. Loopback by default: exposing NBD on a network needs TLS.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: SocketAddr,
    /// Listen on this unix socket instead of TCP.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Most simultaneous client connections.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// An export, repeatable:
    /// `name=NAME,file=PATH,key-file=PATH[,size=SIZE][,sector-size=512|1024|2048|4096]
    /// [,discards][,read-only][,description=TEXT]`. SIZE takes K/M/G/T suffixes (powers of
    /// 1024); without it an existing file's size is used. The key file holds 64 raw bytes or
    /// 128 hex digits.
    #[arg(long = "export", required = true)]
    pub exports: Vec<ExportSpec>,
    /// XTS backend: auto, hw, portable or vaes.
    #[arg(long, env = "NBDCRYPT_XTS_BACKEND", default_value = "auto")]
    pub backend: BackendChoice,
    /// Write the listening address to this file once bound (for scripts and tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// `nbdcrypt keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key (must not exist).
    pub path: PathBuf,
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
