//! fio `verify=crc32c` over 4 connections with large pipelined requests, so that reads and
//! writes run on the sector-parallel workers, not only inline. The server's per-connection
//! close lines count where requests ran; the test requires the workers to have served some.
//! Peers: fio (nbd engine); for the block-device case also losetup (root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

fn fio_verify(dir: &TempDir, uri: &str, bs_min: &str) {
    let job = volumes::fio_verify_randrw(dir, uri, 4, 8, bs_min);
    assert!(job["write"]["io_bytes"].as_u64().unwrap_or(0) > 0, "{job}");
    assert!(job["read"]["io_bytes"].as_u64().unwrap_or(0) > 0, "{job}");
}

#[test]
fn fio_verify_multi_conn_large_requests_run_on_workers() {
    if !peer_available("fio", have("fio")) {
        return;
    }
    let dir = TempDir::new("parallel-file");
    let server = Server::start_with(
        &dir,
        &[
            keyed_export(&dir, "s4k", ",size=32M"),
            keyed_export(&dir, "s512", ",size=32M,sector-size=512"),
        ],
        &["--split-bytes", "64K", "--workers", "3"],
    );
    fio_verify(&dir, &server.uri("s4k"), "4k");
    fio_verify(&dir, &server.uri("s512"), "512");
    let log = server.stop();
    assert!(
        placed(&log, "workers") > 0,
        "no request ran on the workers:\n{log}"
    );
}

#[test]
fn fio_verify_block_device_parallel_writes() {
    // A block device does not serialize writes, so large writes go to the workers too.
    let root = run_ok(Command::new("id").arg("-u")).trim() == "0";
    let prereq = have("fio").and_then(|()| have("losetup")).and_then(|()| {
        if root {
            Ok(())
        } else {
            Err("losetup needs root".into())
        }
    });
    if !peer_available("fio + losetup (root)", prereq) {
        return;
    }
    let dir = TempDir::new("parallel-dev");
    let mut rng = Rng::new(seed("parallel-dev"));
    let (key, _) = key_file(&dir, "k", &mut rng);
    let img = dir.path("dev.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let dev = LoopDev::attach(&img);
    let server = Server::start_with(
        &dir,
        &[format!(
            "name=dev,file={},key-file={},sector-size=512",
            dev.0,
            key.display()
        )],
        &["--split-bytes", "64K"],
    );
    fio_verify(&dir, &server.uri("dev"), "512");
    let log = server.stop();
    assert!(
        placed(&log, "workers") > 0,
        "no request ran on the workers:\n{log}"
    );
}
