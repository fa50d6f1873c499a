//! Command-line grammar. Definitions only: behaviour lives in [`crate::commands`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub mod values;
mod volume;

use crate::crypto::BackendChoice;
use crate::kms::{KmsKind, Origin};
use values::ExportSpec;
pub use volume::{VolumeCommand, VolumeCreateArgs};

/// An NBD server whose every volume is encrypted with XTS-AES-256 (aes-xts-plain64).
#[derive(Debug, Parser)]
#[command(name = "nbdcrypt", version, about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax); `NBDCRYPT_LOG` overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    /// State directory: volume registry, local KMS, audit log. Default:
    /// `$XDG_STATE_HOME/nbdcrypt` or `~/.local/state/nbdcrypt`.
    #[arg(long, global = true, env = "NBDCRYPT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Key service for volumes: the embedded local KMS, or AWS KMS (standard credential and
    /// region chain). `nbdcrypt kms …` always administers the local KMS.
    #[arg(long, global = true, env = "NBDCRYPT_KMS", value_enum, default_value_t = KmsKind::Local)]
    pub kms: KmsKind,
    /// AWS KMS endpoint override (with `--kms aws`).
    #[arg(long, global = true, env = "NBDCRYPT_KMS_ENDPOINT")]
    pub kms_endpoint: Option<String>,
    /// AWS region (with `--kms aws`; default: the standard chain).
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// Attempts per AWS KMS call when KMS cannot be reached, is throttling or fails
    /// internally; between attempts the wait doubles from 0.25 s up to 4 s (jittered). 1: no
    /// retry.
    #[arg(long, global = true, env = "NBDCRYPT_KMS_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=20))]
    pub kms_attempts: u32,
    /// CA certificates (PEM) that upstreams reached by `nbds://` or `nbds+unix://` must present
    /// a certificate chaining to (the certificate must name the URI's host, or
    /// `?tls-hostname=`, default `localhost`, for a Unix socket).
    #[arg(
        long,
        global = true,
        env = "NBDCRYPT_UPSTREAM_TLS_CA",
        value_name = "FILE"
    )]
    pub upstream_tls_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for upstreams that ask for one (with
    /// `--upstream-tls-key`).
    #[arg(
        long,
        global = true,
        requires = "upstream_tls_key",
        requires = "upstream_tls_ca",
        value_name = "FILE"
    )]
    pub upstream_tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        global = true,
        requires = "upstream_tls_cert",
        value_name = "FILE"
    )]
    pub upstream_tls_key: Option<PathBuf>,
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
    Serve(Box<ServeArgs>),
    /// Write a fresh random 512-bit volume key to a file (mode 0600), for `serve --export`.
    Keygen(KeygenArgs),
    /// Create, list, describe and delete named volumes (keys from the local KMS).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Administer keys of the embedded local KMS, and read the audit log.
    #[command(subcommand)]
    Kms(KmsCommand),
    /// Print a shell completion script, e.g. `nbdcrypt completions bash >
    /// /etc/bash_completion.d/nbdcrypt`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `nbdcrypt kms …` (AWS operation names, kebab-case).
#[derive(Debug, Subcommand)]
pub enum KmsCommand {
    /// Create a customer-managed symmetric key; prints its id and ARN.
    CreateKey {
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// An alias for it (`alias/NAME`).
        #[arg(long)]
        alias: Option<String>,
        /// Key spec; only SYMMETRIC_DEFAULT is accepted.
        #[arg(long, default_value = "SYMMETRIC_DEFAULT")]
        key_spec: String,
        /// AWS_KMS (generated) or EXTERNAL (import material later).
        #[arg(long, value_enum, default_value_t = Origin::AwsKms)]
        origin: Origin,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// List keys with their state.
    ListKeys {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show a key's metadata.
    DescribeKey {
        /// Key id, alias or ARN.
        key: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Enable a key.
    EnableKey {
        /// Key id, alias or ARN.
        key: String,
    },
    /// Disable a key. Volumes under it can no longer be opened: `serve` refuses them from its
    /// next start, and a running `serve --kms-recheck N` withdraws them within N seconds. A
    /// server without `--kms-recheck` keeps serving volumes whose key it already unwrapped.
    DisableKey {
        /// Key id, alias or ARN.
        key: String,
    },
    /// Schedule deletion after 7–30 days.
    ScheduleKeyDeletion {
        /// Key id, alias or ARN.
        key: String,
        /// Waiting period.
        #[arg(long, default_value_t = 30)]
        pending_window_in_days: u64,
    },
    /// Cancel a scheduled deletion (the key returns to Disabled).
    CancelKeyDeletion {
        /// Key id, alias or ARN.
        key: String,
    },
    /// Turn on yearly automatic rotation.
    EnableKeyRotation {
        /// Key id, alias or ARN.
        key: String,
    },
    /// Rotate now (old material stays for decryption).
    RotateKeyOnDemand {
        /// Key id, alias or ARN.
        key: String,
    },
    /// List a key's material versions.
    ListKeyRotations {
        /// Key id, alias or ARN.
        key: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Import 32 bytes of key material (hex in a file) into an EXTERNAL key.
    ImportKeyMaterial {
        /// Key id, alias or ARN.
        key: String,
        /// File holding 64 hex digits.
        #[arg(long)]
        material_file: PathBuf,
    },
    /// Create an alias.
    CreateAlias {
        /// `alias/NAME`.
        alias: String,
        /// Key id, alias or ARN.
        key: String,
    },
    /// List aliases.
    ListAliases {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Grant a principal operations on a key (optionally for one encryption-context pair).
    CreateGrant {
        /// Key id, alias or ARN.
        key: String,
        /// Grantee principal ARN.
        #[arg(long)]
        grantee: String,
        /// Operations (repeatable), e.g. Decrypt, GenerateDataKey.
        #[arg(long = "operation", required = true)]
        operations: Vec<String>,
        /// Constraint `KEY=VALUE` the request's encryption context must contain (repeatable).
        #[arg(long = "context-subset")]
        context_subset: Vec<String>,
    },
    /// List a key's grants (with their GrantId).
    ListGrants {
        /// Key id, alias or ARN.
        key: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a grant (key administrators).
    RevokeGrant {
        /// Key id, alias or ARN.
        key: String,
        /// Grant id.
        grant_id: String,
    },
    /// Retire a grant (its grantee or retiring principal).
    RetireGrant {
        /// Key id, alias or ARN.
        key: String,
        /// Grant id.
        grant_id: String,
    },
    /// Replace a key's policy (AWS JSON grammar) from a file.
    PutKeyPolicy {
        /// Key id, alias or ARN.
        key: String,
        /// Policy document file.
        #[arg(long)]
        policy_file: PathBuf,
    },
    /// Print a key's policy.
    GetKeyPolicy {
        /// Key id, alias or ARN.
        key: String,
    },
    /// Show the audit log.
    Audit {
        /// Only this operation (e.g. Decrypt).
        #[arg(long)]
        operation: Option<String>,
        /// Only records about this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Only failures and denials.
        #[arg(long)]
        failures: bool,
        /// JSON lines output.
        #[arg(long)]
        json: bool,
    },
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
    /// A named volume to serve (repeatable). Its key is unwrapped once, at start. With neither
    /// `--volume` nor `--export`, the volume `scratch` is served, created first (1 GiB,
    /// scratch) if it does not exist.
    #[arg(long = "volume")]
    pub volumes: Vec<String>,
    /// An export from a backing file and a raw key file (no KMS), repeatable:
    /// `name=NAME,file=PATH,key-file=PATH[,size=SIZE][,sector-size=512|1024|2048|4096]
    /// [,discards][,read-only][,description=TEXT]`. SIZE takes K/M/G/T suffixes (powers of
    /// 1024); without it an existing file's size is used. The key file holds 64 raw bytes or
    /// 128 hex digits.
    #[arg(long = "export")]
    pub exports: Vec<ExportSpec>,
    /// XTS backend: auto, hw, portable, vaes or vaes256.
    #[arg(long, env = "NBDCRYPT_XTS_BACKEND", default_value = "auto")]
    pub backend: BackendChoice,
    /// Write the listening address to this file once bound (for scripts and tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Crypto worker threads for large requests (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Requests of at least this many bytes are split across the workers; smaller ones run
    /// inline on their connection (K/M suffixes). The default was measured (BENCHMARKING.md).
    #[arg(long, default_value = "128K", value_parser = values::parse_size_usize)]
    pub split_bytes: usize,
    /// Server-wide bound on request payloads in flight, in MiB (each connection is also
    /// bounded to 96 MiB, or one largest request if that is more).
    #[arg(long, default_value_t = 1024)]
    pub max_buffer_mib: usize,
    /// Largest READ or WRITE served, in MiB; advertised as the maximum block size. Larger
    /// reads get EOVERFLOW, larger writes end the connection (their payload cannot be
    /// trusted to be skipped).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_request_mib: u32,
    /// Serve Prometheus metrics (OpenMetrics text) at `http://ADDR/metrics`, e.g.
    /// `127.0.0.1:9474`. Off by default; bind it to loopback or a management network only.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Seconds a client has to finish the NBD handshake; slower (or silent) clients are
    /// disconnected so they cannot hold connection slots.
    #[arg(long, default_value_t = 30.0)]
    pub handshake_timeout: f64,
    /// PEM certificate chain (server certificate first): turns TLS on (`NBD_OPT_STARTTLS`,
    /// TLS 1.3 and 1.2). Without `--tls-required` plaintext clients are still served.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert` (PKCS#8, PKCS#1 or SEC1; keep it mode 600).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Refuse plaintext: every option but STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD`.
    #[arg(long, requires = "tls_cert")]
    pub tls_required: bool,
    /// PEM CA certificate(s): clients must present a certificate signed by one of them
    /// (access control; implies `--tls-required`).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// When started as root: switch to this user (and its primary group, no supplementary
    /// groups) once the volumes are open, the keys unwrapped and the socket bound.
    #[arg(long)]
    pub user: Option<String>,
    /// Re-validate each `--volume`'s wrapped key with one KMS Decrypt every SECONDS (audited
    /// as purpose `recheck`). A disabled, revoked (AccessDenied), deleted or pending-deletion
    /// key withdraws the volume at once: connections cut, key wiped from memory. Off by
    /// default: then a key change takes effect at the next start of the server. An unreachable
    /// KMS is logged and the volume kept.
    #[arg(long, value_name = "SECONDS")]
    pub kms_recheck: Option<f64>,
    /// Seconds between renewals of each volume's serving lease in its header; another server
    /// takes the volume over only after three intervals without a renewal.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub lease_interval: f64,
    /// Take over the serving lease of a volume even though its holder (on another node)
    /// renewed it recently: only when you know that server is gone. A live server on this
    /// node always keeps its volume.
    #[arg(long)]
    pub take_over: bool,
    /// For exports on an upstream NBD server (`file=nbd://…`): how long a request waits for a
    /// lost upstream to come back (reconnecting meanwhile) before it fails with EIO.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub upstream_timeout: f64,
    /// Connections to an upstream NBD server that advertises multi-conn (a flush on one
    /// covers all); an upstream that does not gets one.
    #[arg(long, default_value_t = crate::upstream::DEFAULT_CONNECTIONS, value_name = "N")]
    pub upstream_connections: usize,
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
    /// Backend selection to report on: auto, hw, portable, vaes or vaes256.
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
