//! nbdcrypt: a userspace NBD server whose every volume is encrypted with XTS-AES-256, on the
//! dm-crypt `aes-xts-plain64` layout, with per-volume data keys wrapped by a KMS.
//!
//! # Layout
//!
//! | module | owns | must never |
//! |---|---|---|
//! | [`crypto`] | the XTS sector engine, its backends, [`crypto::VolumeKey`], protected memory | do I/O, log, or let key bytes out |
//! | [`cli`] | the command-line grammar (clap definitions only) | contain logic |
//! | [`commands`] | what each subcommand does (`info`, `benchmark`, `serve`, `volume`, `kms`, raw-key exports and `keygen`) | hold key material beyond one call |
//! | [`codec`] | big-endian byte reading/writing shared by the wire format and the volume header | panic on short input |
//! | [`faults`] | fault-injection hooks for the crash and panic tests (inert unless their variable is set) | act without its environment variable |
//! | [`fsutil`] | creating private (0700) state directories; [`fsutil::StateLayout`], the one place that names where state lives | create anything others can write |
//! | [`human`] | UTC timestamps and IEC sizes for people (JSON keeps raw numbers) | be used for `--json` output |
//! | [`protocol`] | the NBD wire format, pure (no I/O) | panic on any input |
//! | [`server`] | tokio edge: listener, negotiation, pipelined transmission, request validation, crypto workers, payload buffers | touch key bytes |
//! | [`volume`] | plaintext byte ranges ↔ encrypted sectors (head/body/tail, RMW locks), named volumes and headers | keep raw key bytes past opening a volume |
//! | [`storage`] | ciphertext bytes on files and block devices | know keys or plaintext |
//! | [`kms`] | key services (local KMS with policies and grants, AWS KMS), audit log | log or return key bytes except into a `VolumeKey` |
//!
//! Dependencies point one way: `cli → server → volume → {crypto, storage}`,
//! `server → protocol`, `volume → kms` at open time only; `crypto` and `protocol` depend on
//! nothing else in the crate (both use the leaf [`codec`]).

pub mod cli;
pub mod codec;
pub mod commands;
pub mod crypto;
pub mod error;
pub mod faults;
pub mod fsutil;
pub mod human;
pub mod kms;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod storage;
pub mod upstream;
pub mod volume;

// Buffer lengths are converted between u64 and usize freely in the data path.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("nbdcrypt supports 64-bit targets only");
