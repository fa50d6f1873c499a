//! An upstream that stops answering without closing its connection (here: nbdkit stopped with
//! SIGSTOP; in the field, a storage node that lost power behind a TCP connection nobody resets)
//! must not leave requests waiting for good: after `--upstream-timeout` the client gets EIO,
//! the log names the upstream and the reason, and once the upstream answers again the export
//! serves again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::nbdkit::Nbdkit;
use common::{Rng, TempDir, have, peer_available, run_ok, seed};
use nbdcrypt::protocol::consts::{cmd, err};

/// Sends `sig` (STOP, CONT) to `pid`.
fn signal(pid: u32, sig: &str) {
    run_ok(
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string()),
    );
}

/// Reads a reply header; returns its error value and cookie.
fn reply(s: &mut impl Read) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h)
        .expect("a reply, not a hang or a dead server");
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

#[test]
fn requests_to_an_upstream_that_stops_answering_fail_with_eio_then_serve_again() {
    if !peer_available("nbdkit", have("nbdkit")) {
        return;
    }
    let dir = TempDir::new("upstream-stall");
    let kit = Nbdkit::start(&dir, "kit", &["memory", "8M"]);
    let mut rng = Rng::new(seed("upstream stall"));
    let spec = kit.export_spec(&dir, "up", &mut rng);
    let server = common::Server::start_with(&dir, &[spec], &["--upstream-timeout", "1"]);
    let mut s = common::raw_connect(&server.addr, "up");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let data = rng.bytes(65536);
    common::raw_write(&mut s, 1, 0, &data, 0);

    signal(kit.child.id(), "STOP");
    let start = Instant::now();
    // A submitted write and a read, both left unanswered by the stopped upstream.
    let mut w = common::raw_request(cmd::WRITE, 2, 65536, 4096);
    w.extend_from_slice(&rng.bytes(4096));
    s.write_all(&w).unwrap();
    s.write_all(&common::raw_request(cmd::READ, 3, 0, 4096))
        .unwrap();
    let mut seen = vec![reply(&mut s), reply(&mut s)];
    seen.sort_unstable_by_key(|&(_, cookie)| cookie);
    assert_eq!(seen, [(err::EIO, 2), (err::EIO, 3)]);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "answered before the timeout: {waited:?}"
    );

    signal(kit.child.id(), "CONT");
    // Serves again: what was written before the stall reads back.
    let back = common::raw_read(&mut s, 4, 0, 65536);
    assert!(back == data, "the data written before the stall reads back");
    drop(s);
    let log = server.stop();
    assert!(log.contains("no reply for"), "{log}");
    assert!(
        log.contains(&kit.uri("")),
        "the log names the upstream: {log}"
    );
}
