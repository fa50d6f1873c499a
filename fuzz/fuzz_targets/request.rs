//! The transmission request parser: arbitrary bytes as a stream of requests (and payloads)
//! through central validation and execution on an in-memory volume, with structured replies and
//! base:allocation on or off (first byte). Must never panic or hang.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nbdcrypt::protocol::Request;
use nbdcrypt::server::Export;
use nbdcrypt::server::buffers::BufferPool;
use nbdcrypt::server::negotiate::Session;
use nbdcrypt::server::pipeline::Resources;
use nbdcrypt::server::transmit;
use nbdcrypt::server::validate::{Limits, validate};
use nbdcrypt::server::workers::Workers;

fn resources() -> Resources {
    static R: std::sync::OnceLock<Resources> = std::sync::OnceLock::new();
    R.get_or_init(|| Resources {
        workers: Arc::new(Workers::new(2, 64 * 1024).expect("workers")),
        buffers: BufferPool::new(64 << 20),
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if let Ok(req) = Request::decode(rest) {
        let _ = validate(
            &req,
            &Limits {
                size: 1 << 20,
                read_only: mode & 4 != 0,
                structured: mode & 1 != 0,
                trim: mode & 8 != 0,
                block_status: mode & 2 != 0,
                max_payload: if mode & 16 != 0 { 1 << 20 } else { 64 << 20 },
            },
        );
    }
    // One export for the whole run (a volume's locked key pages are costly to set up); the
    // data it holds carries over between inputs, which only widens what reads see.
    static EXPORT: std::sync::OnceLock<Arc<Export>> = std::sync::OnceLock::new();
    let export = EXPORT
        .get_or_init(|| Arc::new(Export::new("fuzz".into(), String::new(), common::volume())));
    let session = Session {
        export: Arc::clone(export),
        structured: mode & 1 != 0,
        block_status: mode & 2 != 0,
    };
    let res = resources();
    common::drive(rest, |server| async move {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let _ = transmit::serve(server, session, res, rx).await;
    });
});
