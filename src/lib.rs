//! nbdcrypt: a userspace NBD server whose every volume is encrypted with XTS-AES-256, on the
//! dm-crypt `aes-xts-plain64` layout, with per-volume data keys wrapped by a KMS.
//!
//! # Layout
//!
//! | module | owns | must never |
//! |---|---|---|
//! | [`crypto`] | the XTS sector engine, its backends, [`crypto::VolumeKey`], protected memory | do I/O, log, or let key bytes out |
//! | [`cli`] | the command-line grammar (clap definitions only) | contain logic |
//! | [`commands`] | what each subcommand does (`info`, `benchmark`, `serve`) | hold key material beyond one call |
//! | [`codec`] | big-endian byte reading/writing shared by the wire format and the volume header | panic on short input |
//! | [`protocol`] | the NBD wire format, pure (no I/O) | panic on any input |
//! | [`server`] | tokio edge: listener, negotiation, pipelined transmission, request validation | touch key bytes |
//! | [`volume`] | plaintext byte ranges ↔ encrypted sectors (head/body/tail, RMW locks) | see raw key bytes |
//! | [`storage`] | ciphertext bytes on files and block devices | know keys or plaintext |
//!
//! Still to come: `kms` (local and AWS key services) with named volumes and headers.
//! Dependencies point one way: `cli → server → volume → {crypto, storage}`,
//! `server → protocol`; `crypto` and `protocol` depend on nothing else in the crate.

pub mod cli;
pub mod codec;
pub mod commands;
pub mod crypto;
pub mod kms;
pub mod protocol;
pub mod server;
pub mod storage;
pub mod volume;

// Buffer lengths are converted between u64 and usize freely in the data path.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("nbdcrypt supports 64-bit targets only");
