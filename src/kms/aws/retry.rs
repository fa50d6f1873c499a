//! The bounded retry of AWS KMS calls: which failures are worth repeating, how long to wait,
//! and the loop that logs each retry and reports the attempts in the final error. The SDK's own
//! retries are off (`AwsKms::connect`), so this is the only retry policy.

use aws_sdk_kms::error::ProvideErrorMetadata;

use super::{AwsKms, map_err};
use crate::kms::{Cause, KmsError};

/// The wait before attempt `attempt + 1`: 0.25 s doubling to 4 s, "equal jitter" (half fixed,
/// half random) so that many servers restarting after an outage do not retry in lockstep.
fn backoff(attempt: u32) -> std::time::Duration {
    let base_ms = (250u64 << attempt.saturating_sub(1).min(4)).min(4000);
    let mut r = [0u8; 8];
    let random = getrandom::fill(&mut r).map_or(0, |()| u64::from_le_bytes(r));
    std::time::Duration::from_millis(base_ms / 2 + random % (base_ms / 2 + 1))
}

/// Whether a failed call may succeed if repeated: the request never reached KMS (connection
/// refused, DNS, TLS), KMS throttled or failed internally, or — for calls that are safe to
/// repeat — the attempt timed out or the response was cut off.
fn transient<E: ProvideErrorMetadata>(
    e: &aws_sdk_kms::error::SdkError<E>,
    idempotent: bool,
) -> bool {
    use aws_sdk_kms::error::SdkError;
    match e {
        SdkError::DispatchFailure(_) => true,
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => idempotent,
        _ => matches!(
            e.code(),
            Some("ThrottlingException" | "KMSInternalException" | "DependencyTimeoutException")
        ),
    }
}

impl AwsKms {
    /// Runs one AWS call, repeating it on transient failures ([`transient`]) up to
    /// `--kms-attempts` times with [`backoff`] between attempts; every retry is logged. `make`
    /// builds the request afresh for each attempt. The final error names the operation, the key,
    /// the reason and, after retries, how many attempts were made over how long.
    pub(super) fn call<T, E, F, Fut>(
        &self,
        operation: &'static str,
        key: &str,
        idempotent: bool,
        make: F,
    ) -> Result<T, KmsError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, aws_sdk_kms::error::SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let attempts = self.settings.attempts.max(1);
        let started = std::time::Instant::now();
        let mut attempt = 1;
        loop {
            let e = match self.rt.block_on(make()) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let retry = transient(&e, idempotent) && attempt < attempts;
            let mut err = map_err(operation, key, e);
            if !retry {
                if attempt > 1
                    && let KmsError::Unavailable { cause, .. } = &mut err
                {
                    *cause = Cause::context(
                        format!(
                            "gave up after {attempt} attempts over {:.1} s (--kms-attempts)",
                            started.elapsed().as_secs_f64()
                        ),
                        cause.clone(),
                    );
                }
                return Err(err);
            }
            let wait = backoff(attempt);
            tracing::warn!(
                operation,
                key,
                attempt,
                attempts,
                retry_in_s = wait.as_secs_f64(),
                error = %err,
                "AWS KMS call failed; retrying"
            );
            std::thread::sleep(wait);
            attempt += 1;
        }
    }
}
