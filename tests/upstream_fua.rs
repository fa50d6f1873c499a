//! `FUA` passes through to the upstream: a client's write with `FUA` over an upstream that
//! offers `FUA` reaches it as one write carrying the flag (nbdkit's log filter shows it),
//! submitted without a thread waiting for it, and not as a write followed by a `FLUSH` on every
//! connection; the data reads back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::nbdkit::Nbdkit;
use common::{Rng, TempDir, have, peer_available, seed};
use nbdcrypt::protocol::consts::cmd_flag;

/// The upstream's log lines for writes of `count` bytes.
fn writes(log: &str, count: usize) -> Vec<&str> {
    let count = format!(" count={count:#x} ");
    log.lines()
        .filter(|l| l.contains(" Write id=") && l.contains(&count))
        .collect()
}

#[test]
fn fua_writes_reach_the_upstream_with_the_flag_and_no_flush() {
    if !peer_available("nbdkit", have("nbdkit")) {
        return;
    }
    let dir = TempDir::new("upstream-fua");
    let up_log = dir.path("upstream.log");
    let logfile = format!("logfile={}", up_log.display());
    let kit = Nbdkit::start(&dir, "kit", &["--filter=log", "memory", "8M", &logfile]);
    let mut rng = Rng::new(seed("upstream fua"));
    let spec = kit.export_spec(&dir, "up", &mut rng);
    let server = common::Server::start(&dir, &[spec]);
    let mut s = common::raw_connect(&server.addr, "up");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // A small write (encrypted on the connection's task) and a large one (on a crypto worker).
    let small = rng.bytes(4096);
    let large = rng.bytes(1 << 20);
    common::raw_write(&mut s, 1, 0, &small, cmd_flag::FUA);
    common::raw_write(&mut s, 2, 1 << 20, &large, cmd_flag::FUA);
    assert!(common::raw_read(&mut s, 3, 0, 4096) == small);
    assert!(common::raw_read(&mut s, 4, 1 << 20, 1 << 20) == large);
    // Before the server stops (which flushes every connection): an emulated FUA would have
    // flushed before its write was answered, so it would be in the log by now.
    let up = std::fs::read_to_string(&up_log).unwrap();
    drop(s);
    let log = server.stop();
    // Both writes and both reads were submitted; a FUA write on the waiting path would count
    // as blocking.
    assert_eq!(common::placed(&log, "submitted"), 4, "{log}");
    assert_eq!(common::placed(&log, "blocking"), 0, "{log}");
    for count in [4096, 1 << 20] {
        let seen = writes(&up, count);
        assert_eq!(seen.len(), 1, "one write of {count} bytes: {up}");
        assert!(seen[0].contains(" fua=1 "), "with FUA: {}", seen[0]);
    }
    assert!(
        !up.contains(" Flush id="),
        "FUA was not emulated with a flush: {up}"
    );
}
