//! Fault injection for the tests that prove crash and panic handling. Inert unless the
//! environment variable named at each hook is set; a server or command started by a user never
//! has them.
//!
//! - `NBDCRYPT_CRASH_AT=POINT`: [`crash_point`] aborts the process at `POINT` (no cleanup, like
//!   `kill -9`), for the kill-at-every-step tests of `volume create`.
//! - `NBDCRYPT_PANIC_AT_OFFSET=N`: [`panic_point`] panics in a `READ` or `WRITE` at byte offset
//!   `N`, wherever the request runs (inline, crypto workers, blocking pool), for the test that
//!   a panic costs one request an `EIO` and nothing else.

use std::sync::OnceLock;

/// Aborts the process when `NBDCRYPT_CRASH_AT` names `point`.
pub fn crash_point(point: &str) {
    if std::env::var_os("NBDCRYPT_CRASH_AT").is_some_and(|v| v == point) {
        std::process::abort();
    }
}

/// Panics when `NBDCRYPT_PANIC_AT_OFFSET` is `offset` (read once, then cached: this is on the
/// request path).
pub fn panic_point(offset: u64) {
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    let at = AT.get_or_init(|| {
        std::env::var("NBDCRYPT_PANIC_AT_OFFSET")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if *at == Some(offset) {
        panic!("fault injection: NBDCRYPT_PANIC_AT_OFFSET={offset}");
    }
}

/// What a caught panic said (its `&str` or `String` payload).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
