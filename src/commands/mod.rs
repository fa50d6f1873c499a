//! What each subcommand does. Each `run` writes its report to the given writer, so that tests
//! can read it without spawning the binary.

pub mod benchmark;
pub mod export;
pub mod info;
pub mod kms;
pub mod progress;
pub mod serve;
pub mod volume;

use std::path::Path;

use crate::kms::KeyService;
use crate::kms::KmsError;

/// The key service the global options select, and its name for volume headers.
pub fn key_service(
    cli_kms: &str,
    endpoint: Option<&str>,
    region: Option<&str>,
    state: &Path,
) -> Result<(Box<dyn KeyService>, &'static str), KmsError> {
    if cli_kms == "aws" {
        let settings = crate::kms::aws::AwsSettings {
            endpoint: endpoint.map(str::to_owned),
            region: region.map(str::to_owned),
            service_principal: std::env::var("NBDCRYPT_AWS_SERVICE_PRINCIPAL").ok(),
        };
        Ok((
            Box::new(crate::kms::aws::AwsKms::connect(state, settings)?),
            "aws",
        ))
    } else {
        Ok((Box::new(crate::kms::local::LocalKms::open(state)), "local"))
    }
}
