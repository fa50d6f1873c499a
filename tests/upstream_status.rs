//! Block status through an upstream: the upstream's `base:allocation` (nbdkit's sparse memory
//! plugin here; an RBD image behind qemu-nbd in the field) shows through nbdcrypt, so a client
//! that maps a volume (`nbdinfo --map`, and with it `nbdcopy` and `qemu-img convert`) sees
//! what was never written as holes instead of reading every byte. What was written is data;
//! the rest reads as zeroes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::nbdkit::Nbdkit;
use common::{Rng, TempDir, have, peer_available, run_ok, seed};

const MIB: u64 = 1 << 20;

#[test]
fn the_upstreams_holes_show_through_block_status() {
    let peers = [
        peer_available("nbdkit", have("nbdkit")),
        peer_available("nbdinfo", have("nbdinfo")),
    ];
    if peers.contains(&false) {
        return;
    }
    let dir = TempDir::new("upstream-status");
    let kit = Nbdkit::start(&dir, "kit", &["memory", "64M"]);
    let mut rng = Rng::new(seed("upstream status"));
    let spec = format!("{},discards", kit.export_spec(&dir, "up", &mut rng));
    let server = common::Server::start(&dir, &[spec]);
    let mut s = common::raw_connect(&server.addr, "up");
    let written = [(MIB, 65536usize), (10 * MIB, 4096)];
    for (i, &(at, len)) in written.iter().enumerate() {
        common::raw_write(&mut s, i as u64 + 1, at, &rng.bytes(len), 0);
    }
    common::raw_flush(&mut s, 9);
    drop(s);

    let uri = format!("nbd://{}/up", server.addr);
    let json = run_ok(Command::new("nbdinfo").args(["--json", "--map", &uri]));
    let map: serde_json::Value = serde_json::from_str(&json).unwrap();
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap();
            (n("offset"), n("length"), n("type"))
        })
        .collect();
    // The whole export, in order, without gaps.
    let mut end = 0;
    for &(offset, length, _) in &extents {
        assert_eq!(offset, end, "{json}");
        end = offset + length;
    }
    assert_eq!(end, 64 * MIB, "{json}");
    // Every written byte is data; holes read as zeroes (type 3: hole, zero).
    let data: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e.2 & 2 == 0)
        .map(|e| (e.0, e.0 + e.1))
        .collect();
    for &(at, len) in &written {
        assert!(
            data.iter().any(|&(a, b)| a <= at && at + len as u64 <= b),
            "{len} bytes written at {at} are data: {json}"
        );
    }
    assert!(extents.iter().all(|e| e.2 == 0 || e.2 == 3), "{json}");
    // And not much more than that (nbdkit allocates 32 KiB pages): the other 63.9 MiB are
    // holes, which a copy skips.
    let data_bytes: u64 = data.iter().map(|(a, b)| b - a).sum();
    assert!(
        data_bytes <= 65536 + 32768,
        "{data_bytes} bytes of data: {json}"
    );
    server.stop();
}
