//! What each subcommand does. Each `run` writes its report to the given writer, so that tests
//! can read it without spawning the binary.

pub mod benchmark;
pub mod info;
pub mod kms;
pub mod serve;
pub mod volume;
