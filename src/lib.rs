//! nbdcrypt: a userspace NBD server whose every volume is encrypted with XTS-AES-256, on the
//! dm-crypt `aes-xts-plain64` layout, with per-volume data keys wrapped by a KMS.
//!
//! # Layout
//!
//! | module | owns | must never |
//! |---|---|---|
//! | [`crypto`] | the XTS sector engine, its backends, [`crypto::VolumeKey`], protected memory | do I/O, log, or let key bytes out |
//! | [`cli`] | the command-line grammar (clap definitions only) | contain logic |
//! | [`commands`] | what each subcommand does (`info`, `benchmark`) | hold key material beyond one call |
//!
//! Modules still to come, with the issues that bring them: `protocol` (pure NBD wire format),
//! `server` (tokio edge), `volume` (byte ranges ↔ encrypted sectors), `storage` (ciphertext
//! files), `kms` (local and AWS key services). Dependencies point one way:
//! `cli → server → volume → {crypto, storage}`; `crypto` depends on nothing else in the crate.

pub mod cli;
pub mod commands;
pub mod crypto;
pub mod protocol;
pub mod storage;
pub mod volume;

// Buffer lengths are converted between u64 and usize freely in the data path.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("nbdcrypt supports 64-bit targets only");
